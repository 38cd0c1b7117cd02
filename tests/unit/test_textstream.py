from inference_svc.textstream import IncrementalDetokenizer, StopMatcher

# A byte table where one emoji (4 bytes) and one "é" (2 bytes) are split across tokens.
EMOJI = "😀".encode()
TABLE = [b"Hi ", EMOJI[:1], EMOJI[1:3], EMOJI[3:], b" caf", "é".encode()[:1], "é".encode()[1:], b"!"]


def test_a_character_split_across_tokens_is_emitted_whole_and_never_as_replacement():
    d = IncrementalDetokenizer(TABLE)
    pieces = [d.push([i]) for i in range(len(TABLE))] + [d.flush()]
    assert "".join(pieces) == "Hi 😀 café!"
    assert "\ufffd" not in "".join(pieces)
    assert pieces[1] == pieces[2] == "" and pieces[3] == "😀"


def test_several_ids_at_once_decode_like_one_by_one():
    d = IncrementalDetokenizer(TABLE)
    assert d.push([0, 1, 2]) == "Hi " and d.push([3, 4]) == "😀 caf"


def test_an_incomplete_character_at_the_end_becomes_one_replacement_character():
    d = IncrementalDetokenizer(TABLE)
    assert d.push([1, 2]) == ""
    assert d.flush() == "\ufffd"


def test_stop_sequence_split_across_pushes_is_found_and_not_emitted():
    m = StopMatcher(["END"])
    assert m.push("hello E") == ("hello ", None)  # "E" may start END: held back
    assert m.push("N") == ("", None)
    assert m.push("D and more") == ("", "END")


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop():
    m = StopMatcher(["END"])
    assert m.push("a E") == ("a ", None)
    assert m.push("X") == ("EX", None)
    assert m.push("EN") == ("", None)
    assert m.flush() == "EN"


def test_the_earliest_of_several_stop_sequences_wins():
    m = StopMatcher(["world", "lo w"])
    assert m.push("hello world") == ("hel", "lo w")


def test_without_stop_sequences_text_passes_straight_through():
    m = StopMatcher([])
    assert m.push("anything E") == ("anything E", None)
    assert m.flush() == ""
