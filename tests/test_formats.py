import json

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
