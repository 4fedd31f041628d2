"""The `vltrain` command: training recipes through `accelerate launch`, and the tools for what a run produced.

    vltrain sft                                          # the SFT demo (as `accelerate launch recipes/sft.py`)
    vltrain sft recipes/configs/sft_lora.yaml data.train_path=train.json data.image_folder=images
    vltrain dpo --config_file accelerate_configs/zero3.yaml --num_processes 8 dpo_full data.train_path=pairs.json
    vltrain serve --model outputs/demo/final             # chat with it in the browser (127.0.0.1:7860)
    vltrain generate --model outputs/demo/final --data eval.json --out preds.jsonl
    vltrain inspect demo                                  # check a config's data before training (HTML report)
    vltrain plot outputs/demo                             # loss / lr / grad norm / eval curves as a PNG
    vltrain merge outputs/lora_run/final/adapter          # adapter + base -> a plain transformers model
    vltrain predict --model outputs/cls_demo/final --data test.json --out predictions.jsonl   # classifiers

`vltrain COMMAND --help` lists what each command takes (for the training commands: every config field).

Training commands take accelerate's `--config_file`, `--num_processes`, `--num_machines`, `--machine_rank`,
`--main_process_ip`, `--main_process_port`, `--gpu_ids`, `--mixed_precision` before the recipe's arguments and pass
them to accelerate. Without a config file (neither `--config_file` nor accelerate's default config) the launch gets
explicit values (1 process, no mixed precision, no dynamo; `--num_processes N > 1` adds `--multi_gpu`), so accelerate
prints no "values were not passed" block. A user mistake ends in the recipe's one-line error as the last line on
screen (exit status 1), never in the launcher's traceback.

One process runs under `patient_launcher`, not accelerate's own single-process launcher: accelerate 1.16's answers
a SIGTERM by terminating the recipe and killing it 5 s later, which cuts a preempted run's last step and checkpoint
save short. `patient_launcher` passes a SIGTERM on to the recipe and waits for it to finish its step, write its
checkpoint and exit (vltrain.faults), then exits with the recipe's status.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPES = {"sft": ("recipes.sft", "SFTConfig"), "dpo": ("recipes.dpo", "DPOConfig"),
           "grpo": ("recipes.grpo", "GRPOConfig"), "cls": ("recipes.cls", "CLSConfig")}
TOOLS = {  # command -> (module with main(argv), one line)
    "serve": ("vltrain.serve", "a chat web page for an exported model (gradio)"),
    "generate": ("vltrain.infer", "batch inference over a JSON / JSONL file, with exact / contains match"),
    "inspect": ("vltrain.inspector", "validate a config's data against the model's processor (HTML report)"),
    "plot": ("vltrain.plots", "plot a run's metrics.jsonl as a PNG"),
    "merge": ("recipes.merge_lora", "merge a LoRA adapter into its base: a plain transformers model"),
    "predict": ("vltrain.predict", "score a file with an exported classifier"),
}
LAUNCH_OPTIONS = ("--config_file", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                  "--main_process_port", "--gpu_ids", "--mixed_precision")


def program(default: str) -> str:
    """The name a tool's argparse shows in its usage line: `vltrain serve` under this CLI, else `default`."""
    return os.environ.get("VLTRAIN_COMMAND") or default


def usage() -> str:
    lines = [__doc__.strip().splitlines()[0], "", "usage: vltrain COMMAND [arguments]  (vltrain COMMAND --help)", "",
             "training (through accelerate launch):"]
    lines += [f"  {name:<9} recipes/{name}.py CONFIG [section.field=value ...]" for name in RECIPES]
    lines += ["", "tools:"] + [f"  {name:<9} {text}" for name, (_, text) in TOOLS.items()]
    return "\n".join(lines)


def split_launch_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch options, the recipe's arguments): the known launch options (`--opt value` or `--opt=value`)
    may come anywhere before or among the recipe's arguments."""
    launch, recipe = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            if "=" in arg:
                launch.append(arg)
            elif i + 1 < len(argv):
                launch += [arg, argv[i + 1]]
                i += 1
            else:
                raise ValueError(f"{arg} needs a value")
        else:
            recipe.append(arg)
        i += 1
    return launch, recipe


def _given(launch: list[str], option: str) -> str | None:
    for i, arg in enumerate(launch):
        if arg == option:
            return launch[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def launch_arguments(launch: list[str]) -> list[str]:
    """The user's launch options plus explicit defaults when accelerate has no config to read them from."""
    from accelerate.commands.config import default_config_file

    if _given(launch, "--config_file") is not None:
        if not Path(_given(launch, "--config_file")).is_file():
            raise ValueError(f"--config_file {_given(launch, '--config_file')!r}: no such file "
                             "(the shipped ones are in accelerate_configs/)")
        return launch
    if Path(default_config_file).is_file():
        return launch
    extra = []
    processes = _given(launch, "--num_processes")
    if processes is None:
        extra += ["--num_processes", "1"]
    elif not processes.isdigit() or int(processes) < 1:
        raise ValueError(f"--num_processes must be a positive integer, got {processes!r}")
    elif int(processes) > 1:
        extra.append("--multi_gpu")
    for option, value in (("--num_machines", "1"), ("--mixed_precision", "no")):
        if _given(launch, option) is None:
            extra += [option, value]
    return launch + extra + ["--dynamo_backend", "no"]


def recipe_file(module: str) -> str:
    spec = importlib.util.find_spec(module)
    return spec.origin


def patient_launcher(args) -> None:
    """accelerate's `simple_launcher` (one process: the recipe as a subprocess with accelerate's environment), with
    a SIGTERM to this process passed on to the recipe and no time limit on the recipe's answer to it. SIGINT is not
    passed on: a terminal's Ctrl-C reaches the recipe itself (same process group). Exits with the recipe's
    status when it failed (its one-line error is already the last line)."""
    from accelerate.commands.launch import prepare_simple_launcher_cmd_env

    cmd, env = prepare_simple_launcher_cmd_env(args)
    process = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        while True:
            try:
                status = process.wait()
                break
            except KeyboardInterrupt:  # the recipe got the same Ctrl-C: wait for it to stop
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    if status:
        sys.exit(status if status > 0 else 128 - status)


def train(command: str, argv: list[str]) -> int:
    """`vltrain sft|dpo|grpo|cls ...`: the recipe under accelerate launch, in this process (so that the launcher's
    own exception for a failed child is caught here, not printed); returns the exit status."""
    module, cls_name = RECIPES[command]
    if any(arg in ("-h", "--help") for arg in argv):
        import vltrain.config as config
        from vltrain.run import recipe_help

        doc = importlib.import_module(module).__doc__
        print(recipe_help(doc, getattr(config, cls_name)).replace("usage: ", f"usage: vltrain {command} [launch options] ", 1))
        print("\nlaunch options (passed to accelerate launch): " + " ".join(f"{o} X" for o in LAUNCH_OPTIONS))
        return 0
    launch, recipe_args = split_launch_args(argv)
    launch = launch_arguments(launch)
    import accelerate.commands.launch as accelerate_launch

    args = accelerate_launch.launch_command_parser().parse_args([*launch, "--quiet", recipe_file(module), *recipe_args])
    with tempfile.NamedTemporaryFile("r", suffix=".vltrain-error", delete=False) as error_file:
        os.environ["VLTRAIN_ERROR_FILE"] = error_file.name
    for noisy in ("torch.distributed.elastic", "accelerate.commands.launch"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    def repeat_errors() -> None:  # the ranks' one-line errors, once each, as the last lines
        errors = list(dict.fromkeys(Path(error_file.name).read_text().splitlines()))
        print("\n".join(errors) if errors else f"vltrain {command}: the training processes failed (see above)",
              file=sys.stderr)

    stock_launcher, accelerate_launch.simple_launcher = accelerate_launch.simple_launcher, patient_launcher
    try:
        accelerate_launch.launch_command(args)
        return 0
    except SystemExit as e:
        # the single-process launcher under --quiet: the recipe's error is already the last line; accelerate
        # >= 1.16 reports a failed multi-process job itself (torchrun's summary block) and exits
        code = e.code if isinstance(e.code, int) else 1
        if code and (args.num_processes or 1) > 1:
            repeat_errors()
        return code
    except Exception:  # torchrun's ChildFailedError, or CalledProcessError (older accelerate)
        repeat_errors()
        return 1
    finally:
        accelerate_launch.simple_launcher = stock_launcher
        Path(error_file.name).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in RECIPES:
            return train(command, rest)
        if command in TOOLS:
            module = importlib.import_module(TOOLS[command][0])
            os.environ["VLTRAIN_COMMAND"] = f"vltrain {command}"  # the usage line names what the user typed
            result = module.main(rest)
            return result if isinstance(result, int) else 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"vltrain: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
