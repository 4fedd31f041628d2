import json
import re

import pytest

from vltrain.data.formats import DataFormatError, load_conversations, parse_record


def kinds(turn):
    return [(p.kind, p.value) for p in turn.parts]


def test_llava_single_image_string_and_multiturn():
    conv = parse_record({"id": "x", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A bus."},
        {"from": "human", "value": "And?"}, {"from": "gpt", "value": "Red."}]}, 0)
    assert [t.role for t in conv.turns] == ["user", "assistant", "user", "assistant"]
    assert kinds(conv.turns[0]) == [("image", "a.jpg"), ("text", "What?")]


def test_multi_image_placeholders_consumed_in_order_across_turns():
    conv = parse_record({"image": ["a.jpg", "b.jpg", "c.jpg"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."},
        {"from": "human", "value": "Now <image> this"}, {"from": "gpt", "value": "Different."}]}, 0)
    assert kinds(conv.turns[0]) == [("image", "a.jpg"), ("image", "b.jpg"), ("text", "Compare.")]
    assert kinds(conv.turns[2]) == [("text", "Now "), ("image", "c.jpg"), ("text", " this")]


def test_media_without_placeholders_go_first_in_first_user_turn():
    conv = parse_record({"video": "v.mp4", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Ok."}]}, 0)
    assert kinds(conv.turns[0]) == [("video", "v.mp4"), ("image", "a.jpg"), ("text", "Describe.")]


def test_per_sample_system_field_and_messages_format():
    conv = parse_record({"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, 0)
    assert conv.turns[0].role == "system" and kinds(conv.turns[0]) == [("text", "Be brief.")]
    conv = parse_record({"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "Q"},
                                     {"type": "image_url", "image_url": {"url": "b.jpg"}},
                                     {"type": "video", "video": "v.mp4"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]}, 0)
    assert kinds(conv.turns[1]) == [("image", "a.jpg"), ("text", "Q"), ("image", "b.jpg"), ("video", "v.mp4")]
    assert conv.images == ["a.jpg", "b.jpg"] and conv.videos == ["v.mp4"]


@pytest.mark.parametrize("record, message", [
    ({"image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image> x"},
                                                     {"from": "gpt", "value": "y"}]}, "placeholders"),
    ({"conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]}, "more <image>"),
    ({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}, "from='robot'"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant turn"),
    ({"text": "hello"}, "needs 'conversations'"),
    ({"image": 3, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}, "'image'"),
])
def test_bad_records_raise_naming_the_sample(record, message):
    with pytest.raises(DataFormatError, match="sample 7") as info:
        parse_record({"id": "bad-one", **record}, 7, "train.json")
    assert message in str(info.value) and "bad-one" in str(info.value)


def test_json_and_jsonl_files_load_the_same(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
               for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    a, b = load_conversations(tmp_path / "d.json"), load_conversations(tmp_path / "d.jsonl")
    assert a == b and len(a) == 3
    (tmp_path / "broken.jsonl").write_text(json.dumps(records[0]) + "\n{oops\n")
    with pytest.raises(DataFormatError, match="broken.jsonl:2"):
        load_conversations(tmp_path / "broken.jsonl")


def _llava(*turns, **fields):
    return {"id": "x", **fields, "conversations": [{"from": role, "value": value} for role, value in turns]}


@pytest.mark.parametrize("record, turn, message", [
    (_llava(("human", "q"), ("system", "s"), ("gpt", "a")), 1, "a system turn may only come first"),
    (_llava(("human", "q"), ("human", "q2"), ("gpt", "a")), 1, "two user turns in a row"),
    (_llava(("human", "q"), ("gpt", "a"), ("gpt", "a2")), 2, "two assistant turns in a row"),
    (_llava(("gpt", "a"), ("human", "q")), 0, "starts with an assistant turn"),
    (_llava(("system", "s"), ("gpt", "a")), 1, "starts with an assistant turn"),
    (_llava(("human", "q"), ("gpt", "a"), ("human", "q2")), 2, "ends with a user turn"),
    (_llava(("human", "q"), ("gpt", "  \n")), 1, "empty assistant turn"),
    (_llava(("system", "s")), 0, "only a system turn, no user turn"),
    ({"id": "x", "messages": [{"role": "user", "content": []}, {"role": "assistant", "content": "a"}]}, 0,
     "empty user turn"),
    ({"id": "x", "messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}]}, 1, "two user turns in a row"),
])
def test_bad_conversation_shapes_name_file_sample_id_and_turn(record, turn, message):
    with pytest.raises(DataFormatError) as info:
        parse_record(record, 3, "train.json")
    text = str(info.value)
    assert text.startswith(f"train.json: sample 3 (id='x') turn {turn}: ") and message in text
    assert "\n" not in text


def test_prompt_only_records_are_accepted_when_asked(tmp_path):
    record = _llava(("human", "q"), ("gpt", "a"), ("human", "q2"))
    conv = parse_record(record, 0, require_reply=False)
    assert [t.role for t in conv.turns] == ["user", "assistant", "user"] and not conv.has_reply
    (tmp_path / "p.jsonl").write_text(json.dumps(record) + "\n")
    assert not load_conversations(tmp_path / "p.jsonl", require_reply=False)[0].has_reply
    with pytest.raises(DataFormatError, match="sample 0 .* turn 2: ends with a user turn"):
        load_conversations(tmp_path / "p.jsonl")
    # the other shape rules still hold for prompts
    with pytest.raises(DataFormatError, match="two user turns in a row"):
        parse_record(_llava(("human", "q"), ("human", "q")), 0, require_reply=False)


def test_an_image_only_turn_is_not_empty():
    conv = parse_record(_llava(("human", "<image>"), ("gpt", "a"), image="a.jpg"), 0)
    assert kinds(conv.turns[0]) == [("image", "a.jpg")]


@pytest.mark.parametrize("content", ["", "   \n", "[]", "\n\n"])
def test_an_empty_data_file_names_the_file(tmp_path, content):
    path = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    path.write_text(content)
    with pytest.raises(DataFormatError, match=f"^{re.escape(str(path))}: the data file holds no records$"):
        load_conversations(path)


def test_extra_fields_are_kept_and_format_fields_are_not():
    conv = parse_record(_llava(("human", "q"), ("gpt", "a"), system="Be brief.", image=[],
                               reward=[0.5, 1.0], label=3, pair_id="p7"), 0)
    assert conv.extra == {"reward": [0.5, 1.0], "label": 3, "pair_id": "p7"}
    conv = parse_record({"id": "m", "messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}], "answer": "a"}, 0)
    assert conv.extra == {"answer": "a"}
    assert parse_record(_llava(("human", "q"), ("gpt", "a")), 0).extra == {}


def test_source_and_index_are_kept_but_not_compared(tmp_path):
    records = [_llava(("human", "q"), ("gpt", "a"))] * 2
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    a, b = load_conversations(tmp_path / "a.json"), load_conversations(tmp_path / "b.jsonl")
    assert a == b and [c.index for c in a] == [0, 1]
    assert a[1].source == str(tmp_path / "a.json") and b[1].source == str(tmp_path / "b.jsonl")


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "image": "a.jpg"},
     "field 'image' belongs to LLaVA records"),
    ({"messages": [], "conversations": []}, "both 'conversations' and 'messages'"),
    (_llava(("system", "s"), ("human", "q"), ("gpt", "a"), system="t"), "both a 'system' field and a system turn"),
])
def test_ambiguous_records_are_refused(record, message):
    with pytest.raises(DataFormatError, match="sample 0") as info:
        parse_record(record, 0)
    assert message in str(info.value)


def test_system_field_works_for_messages_records_and_empty_means_none():
    conv = parse_record({"system": "S", "messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}]}, 0)
    assert [t.role for t in conv.turns] == ["system", "user", "assistant"] and "system" not in conv.extra
    assert [t.role for t in parse_record(_llava(("human", "q"), ("gpt", "a"), system=""), 0).turns] == \
        ["user", "assistant"]
