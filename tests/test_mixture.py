"""Several training files (vltrain.data.mixture): parsing, the config errors, the per-epoch weighted draw,
token-budget batching over it, accelerate's 2-rank shards, resume, and a real SFT recipe run on two files."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader

from vltrain.config import DataConfig, SFTConfig, dump_config, from_dict, load_config
from vltrain.data.loader import build_loader
from vltrain.data.mixture import MixtureSampler, mixture_counts
from vltrain.data.packing import TokenBudgetBatchSampler
from vltrain.progress import _set_sampler_epoch, resumable_batches

from conftest import sft_config


def _text_records(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "conversations": [{"from": "human", "value": f"Say {prefix} {i}." + " word" * (i % 5)},
                                                       {"from": "gpt", "value": f"{prefix} {i}"}]} for i in range(n)]


def _write(path, records, jsonl=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records))
    return path


class FileRecords:
    """A dataset whose items are their own indices and whose samples name a file (what build_loader reads)."""

    def __init__(self, sizes: dict[str, int]):
        self.convs = [SimpleNamespace(source=path, index=i) for path, n in sizes.items() for i in range(n)]

    def __len__(self):
        return len(self.convs)

    def __getitem__(self, index):
        return index

    def conversation(self, index):
        return self.convs[index]


def _data(**values) -> DataConfig:
    return from_dict(DataConfig, {"num_workers": 0, **values}, "data")


def _loader(dataset, data_cfg, micro_batch_size=2, seed=3):
    return build_loader(dataset, data_cfg, None, None, micro_batch_size=micro_batch_size, shuffle=True, seed=seed,
                        collate_fn=list)


# ------------------------------------------------------------------------------------------ parsing
def test_yaml_list_dotted_overrides_and_the_resolved_config_round_trip(tmp_path):
    config = tmp_path / "mix.yaml"
    config.write_text("data:\n  train_path: [a.json, b.jsonl]\n  weights: [0.7, 0.3]\n")
    cfg = load_config(SFTConfig, config)
    assert cfg.data.train_path == ["a.json", "b.jsonl"] and cfg.data.weights == [0.7, 0.3]
    assert cfg.data.train_paths() == ["a.json", "b.jsonl"] and not cfg.data.is_synthetic()

    cfg = load_config(SFTConfig, None, ["data.train_path=[a.json,b.json,c.json]", "data.weights=[2,1,0]"])
    assert cfg.data.train_path == ["a.json", "b.json", "c.json"] and cfg.data.weights == [2.0, 1.0, 0.0]
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(SFTConfig, tmp_path / "config.yaml")
    assert again == cfg and again.data.train_path == ["a.json", "b.json", "c.json"]

    single = load_config(SFTConfig, None, ["data.train_path=one.json"])  # a str stays a str
    assert single.data.train_path == "one.json" and single.data.weights is None
    dump_config(single, tmp_path / "single.yaml")
    assert load_config(SFTConfig, tmp_path / "single.yaml").data.train_path == "one.json"
    assert load_config(SFTConfig, None, ["data.train_path=synthetic:shapes"]).data.is_synthetic()


@pytest.mark.parametrize("overrides, words", [
    (["data.train_path=a.json", "data.weights=[1.0]"], ["data.weights", "a.json"]),
    (["data.train_path=[a.json]", "data.weights=[1.0]"], ["data.weights", "a.json"]),
    (["data.train_path=[a.json,b.json]", "data.weights=[1.0,2.0,3.0]"], ["data.weights", "3 values", "a.json, b.json"]),
    (["data.train_path=[a.json,b.json]", "data.weights=[1.0,-0.5]"], ["data.weights[1]", "b.json"]),
    (["data.train_path=[a.json,b.json]", "data.weights=[0,0]"], ["data.weights", "all 0", "a.json, b.json"]),
    (["data.train_path=[a.json,synthetic:shapes]"], ["data.train_path[1]", "synthetic:shapes"]),
    (["data.train_path=[a.json,a.json]"], ["data.train_path[1]", "a.json", "twice"]),
    (["data.train_path=[]"], ["data.train_path", "empty"]),
])
def test_config_mistakes_are_one_line_errors_naming_the_field_and_file(overrides, words):
    with pytest.raises(ValueError) as error:
        load_config(SFTConfig, None, overrides)
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_trained_data_section_with_weights_rebuilds_with_another_path():
    """vltrain.predict / vltrain.inference rebuild the exported run's data section with train_path "" or the file
    to predict on, keeping its weights (unused there): that must load; a training config must not."""
    trained = {"train_path": ["a.json", "b.json"], "weights": [0.7, 0.3], "num_workers": 0}
    for path in ("", "predict_me.jsonl"):
        assert from_dict(DataConfig, {**trained, "train_path": path}, "data").weights == [0.7, 0.3]
    with pytest.raises(ValueError, match="data.weights"):
        load_config(SFTConfig, None, ["data.train_path=predict_me.jsonl", "data.weights=[0.7,0.3]"])


def test_a_missing_listed_file_fails_in_open_run_before_any_model_loads(tmp_path, monkeypatch):
    import recipes.sft

    a = _write(tmp_path / "a.json", _text_records("a", 2))
    cfg = load_config(SFTConfig, None, [f"data.train_path=[{a},{tmp_path / 'gone.jsonl'}]", "data.weights=[1,1]",
                                        f"train.output_dir={tmp_path / 'out'}", "train.report_to=none"])
    monkeypatch.setattr(recipes.sft, "build_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=r"data\.train_path\[1\]: data file .*gone\.jsonl.* does not exist"):
        recipes.sft.main(cfg)
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_concatenated_files_keep_their_own_file_and_index(tmp_path):
    from vltrain.data.formats import load_conversations
    from vltrain.run import open_run

    a = _write(tmp_path / "a.json", _text_records("a", 3))
    b = _write(tmp_path / "b.jsonl", _text_records("b", 2), jsonl=True)  # a JSONL file beside a JSON list
    cfg = load_config(SFTConfig, None, [f"data.train_path=[{a},{b}]", "train.report_to=none"])
    _, records = open_run(cfg, load_conversations)
    assert [(c.sample_id, c.source, c.index) for c in records["train"]] == [
        ("a0", str(a), 0), ("a1", str(a), 1), ("a2", str(a), 2), ("b0", str(b), 0), ("b1", str(b), 1)]


# ------------------------------------------------------------------------------------------ the draw
def test_counts_per_file_per_epoch_are_the_weights_shares():
    assert mixture_counts([0.7, 0.3], 50) == [35, 15]
    assert mixture_counts([1, 1, 1], 10) == [4, 3, 3]  # 3.33 each: the remainder goes to the earliest
    assert mixture_counts([2, 0, 1], 7) == [5, 0, 2]  # 4.67 / 0 / 2.33
    sizes = {"a.json": 30, "b.json": 6, "c.json": 14}
    dataset = FileRecords(sizes)
    loader = _loader(dataset, _data(train_path=list(sizes), weights=[0.5, 0.3, 0.2]))
    sampler = loader.batch_sampler.sampler
    assert isinstance(sampler, MixtureSampler) and sampler.counts == [25, 15, 10]
    for epoch in range(3):
        _set_sampler_epoch(loader, epoch)  # what the loops call before each epoch
        drawn = Counter(dataset.conversation(i).source for batch in loader for i in batch)
        assert drawn == {"a.json": 25, "b.json": 15, "c.json": 10}


def test_a_file_asked_for_more_repeats_every_record_once_before_twice_and_one_asked_for_fewer_is_subset():
    groups = [list(range(0, 12)), list(range(12, 16))]  # 12 records in a, 4 in b
    sampler = MixtureSampler(groups, [1, 3], seed=0)  # 16 draws: 4 from a, 12 from b
    assert sampler.counts == [4, 12]
    subsets = set()
    for epoch in range(5):
        order = sampler.order(epoch)
        assert len(order) == 16
        from_a = [i for i in order if i < 12]
        assert len(from_a) == 4 and len(set(from_a)) == 4  # a subset, no repeats
        subsets.add(frozenset(from_a))
        assert Counter(i for i in order if i >= 12) == {12: 3, 13: 3, 14: 3, 15: 3}
    assert len(subsets) > 1  # a new subset every epoch
    uneven = MixtureSampler([list(range(3)), list(range(3, 13))], [2, 1], seed=1)  # a: 9 draws of 3 records
    assert uneven.counts == [9, 4]
    for epoch in range(4):
        times = Counter(i for i in uneven.order(epoch) if i < 3)
        assert sorted(times.values()) == [3, 3, 3]
    once_more = MixtureSampler([list(range(3)), list(range(3, 13))], [3, 1], seed=1)  # 10 draws of 3 records
    for epoch in range(4):
        assert sorted(Counter(i for i in once_more.order(epoch) if i < 3).values()) == [3, 3, 4]


def test_the_draw_is_deterministic_per_seed_and_epoch_and_changes_every_epoch():
    groups = [list(range(10)), list(range(10, 14))]
    first, second = MixtureSampler(groups, [1, 1], seed=7), MixtureSampler(groups, [1, 1], seed=7)
    assert first.order(2) == second.order(2)
    assert first.order(0) != first.order(1)
    assert MixtureSampler(groups, [1, 1], seed=8).order(0) != first.order(0)
    second.set_epoch(4)
    assert list(second) == first.order(4)
    plain = MixtureSampler(groups, [1, 1], seed=7)  # a DataLoader that never calls set_epoch
    assert [list(plain), list(plain)] == [first.order(0), first.order(1)]


def test_token_budget_batches_cut_the_mixtures_order(tmp_path):
    from vltrain.data.dataset import SFTDataset
    from vltrain.data.media import MediaOptions
    from vltrain.tiny import build_tiny_processor

    a = _write(tmp_path / "a.json", _text_records("a", 9))
    b = _write(tmp_path / "b.json", _text_records("b", 3))
    data = _data(train_path=[str(a), str(b)], weights=[1, 1], max_tokens_per_batch=256, max_seq_length=128)
    processor = build_tiny_processor("qwen2_vl")
    records = [conv for path in (a, b) for conv in SFTDataset(path, processor, MediaOptions(), max_seq_length=128).conversations]
    dataset = SFTDataset(records, processor, MediaOptions(), max_seq_length=128)
    loader = build_loader(dataset, data, processor, None, micro_batch_size=1, shuffle=True, seed=5, collate_fn=list)
    sampler = loader.batch_sampler
    assert isinstance(sampler, TokenBudgetBatchSampler) and sampler.order is not None
    mixture = MixtureSampler([list(range(9)), list(range(9, 12))], [1, 1], seed=5)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert [i for batch in batches for i in batch] == mixture.order(epoch)  # the mixture's order, cut in turn
        assert all(sum(sampler.lengths[i] for i in batch) <= 256 for batch in batches)
        assert len(batches) > 1
        assert Counter(i < 9 for batch in batches for i in batch) == {True: 6, False: 6}


@pytest.mark.parametrize("budget", [None, 10])
def test_two_ranks_get_disjoint_batches_that_cover_the_epoch(budget):
    """Each rank builds the same loader and accelerate shards it (prepare_data_loader, as Accelerator.prepare
    does for rank 0 and rank 1 of 2): rank r gets batches r, r+2, ... of the single-process epoch."""
    sizes = {"a.json": 10, "b.json": 6}
    dataset = FileRecords(sizes)
    data = _data(train_path=list(sizes), weights=[1, 3])

    def build():
        if budget is None:
            return _loader(dataset, data, micro_batch_size=2)
        mixture = MixtureSampler([list(range(10)), list(range(10, 16))], [1, 3], seed=3)
        from torch.utils.data import DataLoader

        lengths = [1 + i % 4 for i in range(16)]
        return DataLoader(dataset, batch_sampler=TokenBudgetBatchSampler(lengths, budget, order=mixture.order),
                          collate_fn=list)

    whole = build()
    _set_sampler_epoch(whole, 1)
    batches = list(whole)
    assert Counter(dataset.conversation(i).source for batch in batches for i in batch) == {"a.json": 4, "b.json": 12}
    shards = []
    for rank in range(2):
        shard = prepare_data_loader(build(), num_processes=2, process_index=rank, put_on_device=False,
                                    use_seedable_sampler=True)
        _set_sampler_epoch(shard, 1)
        shards.append(list(shard))
    if len(batches) % 2:  # accelerate evens the last round out with the epoch's first batch
        batches.append(batches[0])
    assert shards[0] == batches[0::2] and shards[1] == batches[1::2]


def test_a_resumed_epoch_sees_the_straight_runs_order(tmp_path):
    """resumable_batches (the loops' stream): set_epoch, then the done batches skipped by accelerate."""
    sizes = {"a.json": 10, "b.json": 4}
    data = _data(train_path=list(sizes), weights=[1, 2])
    accelerator = Accelerator(cpu=True)
    straight = accelerator.prepare(_loader(FileRecords(sizes), data))
    per_epoch = len(straight)
    stream = resumable_batches(accelerator, straight)
    seen = [next(stream) for _ in range(2 * per_epoch)]
    resumed = resumable_batches(accelerator, accelerator.prepare(_loader(FileRecords(sizes), data)), 1, 3)
    again = [next(resumed) for _ in range(per_epoch - 3 + 2)]
    assert [(e, i, b) for e, i, b in again[: per_epoch - 3]] == seen[per_epoch + 3:]
    epoch_two = MixtureSampler([list(range(10)), list(range(10, 14))], [1, 2], seed=3).order(2)
    assert [i for _, _, b in again[per_epoch - 3:] for i in b] == epoch_two[:4]


# ------------------------------------------------------------------------------------------ a real run
def test_sft_recipe_on_two_weighted_files_draws_by_weight_and_names_the_file_of_a_skip(tmp_path, monkeypatch, capsys,
                                                                                         one_thread):
    from recipes.sft import main
    from vltrain.data.dataset import SFTDataset

    a = _write(tmp_path / "a.json", _text_records("a", 12))
    b_records = _text_records("b", 4)
    b_records[2] = {**b_records[2], "image": "missing.png"}  # skipped at load time, in file b
    b = _write(tmp_path / "b.jsonl", b_records, jsonl=True)
    requested = []
    original = SFTDataset.__getitem__
    monkeypatch.setattr(SFTDataset, "__getitem__", lambda self, i: requested.append(self.conversation(i)) or original(self, i))
    cfg = sft_config(tmp_path, "qwen2_vl", a, **{"data.train_path": f"[{a},{b}]", "data.weights": "[1,3]",
                                                 "data.max_bad_fraction": 0.5, "train.micro_batch_size": 4,
                                                 "train.max_steps": 4, "data.max_seq_length": 128})
    summary = main(cfg)
    assert summary["steps"] == 4 and len(requested) == 16  # one epoch: 16 draws
    assert Counter(c.source for c in requested) == {str(a): 4, str(b): 12}
    assert Counter(c.sample_id for c in requested if c.source == str(b)) == {"b0": 3, "b1": 3, "b2": 3, "b3": 3}
    assert summary["num_skipped"] == 1
    assert [(r["file"], r["index"], r["id"]) for r in summary["skipped"]["records"]] == [(str(b), 2, "b2")]
    out = capsys.readouterr().out
    assert f"train files: {a} 12 records, {b} 4 records; each epoch draws 16: 4 from {a}" in out
    assert f"12 from {b} (3.00x its records)" in out
    assert load_config(SFTConfig, tmp_path / "out" / "config.yaml").data.weights == [1.0, 3.0]


def test_the_inspector_reads_every_listed_train_file(tmp_path):
    from vltrain.inspector import inspect_data
    from vltrain.tiny import build_tiny_processor

    a = _write(tmp_path / "a.json", _text_records("a", 5))
    b_records = _text_records("b", 3)
    b_records[1] = {**b_records[1], "image": "missing.png"}
    b = _write(tmp_path / "b.jsonl", b_records, jsonl=True)
    cfg = load_config(SFTConfig, None, [f"data.train_path=[{a},{b}]", "data.weights=[1,1]", "data.max_seq_length=128",
                                        f"data.image_folder={tmp_path}", f"train.output_dir={tmp_path / 'out'}",
                                        "train.micro_batch_size=2"])
    report = inspect_data(cfg, "sft", processor=build_tiny_processor("qwen2_vl"), image_factor=28, num_examples=1,
                          show_progress=False)
    splits = report["splits"]
    assert list(splits) == ["train", "train[1]"] and [s["path"] for s in splits.values()] == [str(a), str(b)]
    assert splits["train"]["num_usable"] == 5 and splits["train[1]"]["num_usable"] == 2
    assert [r["id"] for r in splits["train[1]"]["rejected"]] == ["b1"]
    assert report["estimate"]["num_samples"] == 8 and report["estimate"]["micro_batches_per_epoch"] == 4


def test_dpo_reference_cache_hashes_every_listed_file_and_weights_refuse_what_needs_every_record(tmp_path):
    from recipes.dpo import reference_cache
    from vltrain.config import CLSConfig, DPOConfig

    a, b = _write(tmp_path / "a.json", [{"id": 1}]), _write(tmp_path / "b.json", [{"id": 2}])
    cfg = load_config(DPOConfig, None, [f"data.train_path=[{a},{b}]", "dpo.precompute_ref_log_probs=true",
                                        f"train.output_dir={tmp_path}"])
    before = reference_cache(cfg, cfg.data.train_path, "train")
    assert before.name.startswith("train-a+b-")
    _write(b, [{"id": 3}])
    assert reference_cache(cfg, cfg.data.train_path, "train") != before  # the second file's bytes count too
    with pytest.raises(ValueError, match="dpo.precompute_ref_log_probs .* data.weights"):
        load_config(DPOConfig, None, [f"data.train_path=[{a},{b}]", "data.weights=[1,1]",
                                      "dpo.precompute_ref_log_probs=true"])
    with pytest.raises(ValueError, match="cls.balanced_sampler .* data.weights"):
        load_config(CLSConfig, None, [f"data.train_path=[{a},{b}]", "data.weights=[1,1]", "cls.num_labels=2",
                                      "cls.balanced_sampler=true"])


def test_sft_run_on_a_weighted_mixture_resumed_mid_epoch_gives_the_straight_losses(tmp_path, one_thread):
    """12 draws of 4 per micro-batch: 3 steps per epoch; resumed from the checkpoint of step 4 (one micro-batch into
    epoch 1), step 5 trains on the straight run's batch and gives its loss."""
    import shutil

    from recipes.sft import main
    from vltrain.checkpoint import checkpoint_dirs

    a = _write(tmp_path / "a.json", _text_records("a", 8))
    b = _write(tmp_path / "b.json", _text_records("b", 4))
    cfg = sft_config(tmp_path, "qwen2_vl", a, **{"data.train_path": f"[{a},{b}]", "data.weights": "[1,2]",
                                                 "train.micro_batch_size": 4, "train.max_steps": 5,
                                                 "train.save_every": 4, "data.max_seq_length": 128})
    straight = main(cfg)["losses"]
    assert len(straight) == 5
    final = checkpoint_dirs(cfg.train.output_dir)[-1]
    assert final.name == "step_000005"
    shutil.rmtree(final)  # as if stopped after step 4
    cfg.train.resume = "auto"
    resumed = main(cfg)
    assert resumed["losses"] == straight, (straight, resumed["losses"])
    assert final.is_dir()  # step 5 trained anew


def test_dpo_recipe_on_two_concatenated_pair_files_with_precomputed_reference(tmp_path, one_thread):
    from recipes.dpo import main
    from vltrain.config import DPOConfig

    def pairs(prefix, n):
        return [{"id": f"{prefix}{i}", "prompt": f"Say {prefix} {i}.", "chosen": f"{prefix} {i}", "rejected": "no"}
                for i in range(n)]

    a = _write(tmp_path / "a.json", pairs("a", 3))
    b = _write(tmp_path / "b.jsonl", pairs("b", 3), jsonl=True)
    overrides = {"model.name_or_path": "tiny:qwen2_vl", "model.dtype": "float32", "model.attn_implementation": "sdpa",
                 "data.train_path": f"[{a},{b}]", "data.num_workers": 0, "data.max_seq_length": 128,
                 "dpo.precompute_ref_log_probs": "true", "train.output_dir": str(tmp_path / "out"),
                 "train.report_to": "none", "train.max_steps": 3, "train.micro_batch_size": 2}
    summary = main(load_config(DPOConfig, None, [f"{k}={v}" for k, v in overrides.items()]))
    assert summary["steps"] == 3
    cache = list((tmp_path / "out" / "ref_logps").glob("train-a+b-*.json"))
    assert len(cache) == 1 and set(json.loads(cache[0].read_text())["logps"]) == {"a0", "a1", "a2", "b0", "b1", "b2"}
