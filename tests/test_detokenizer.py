from mlpspec.detokenizer import Detokenizer


def chars(ids):
    return "".join(chr(i) for i in ids)


def ids(text):
    return [ord(c) for c in text]


def test_text_that_may_start_a_stop_string_waits_and_the_stop_ends_at_its_token():
    words = Detokenizer(chars, ["cd", "xyz"])
    assert words.take(ids("abc")) == ("ab", 3)  # "c" may start "cd"
    assert words.take(ids("cx")) == ("cc", 2)  # "x" may start "xyz"
    assert words.take(ids("xdexy")) == ("xxde", 5)  # "xy" may start "xyz"
    assert not words.stopped
    # "cd" completes at the second token: the text ends before it, the rest is not taken
    words = Detokenizer(chars, ["cd"])
    assert words.take(ids("ab")) == ("ab", 2)
    assert words.take(ids("xcdef")) == ("x", 3) and words.stopped and words.text == "abx"
    assert words.tokens == ids("abxcd")


def test_the_last_tokens_show_everything_and_no_stops_show_at_once():
    words = Detokenizer(chars, ["cd"])
    assert words.take(ids("abc")) == ("ab", 3)
    assert words.take([], final=True) == ("c", 0)
    plain = Detokenizer(chars)
    assert plain.take(ids("abc")) == ("abc", 3) and plain.take(ids("d")) == ("d", 1)


def test_half_a_character_waits_for_the_rest():
    halves = Detokenizer(lambda ids: "ab\ufffd" if ids == [1] else "abé")
    assert halves.take([1]) == ("ab", 1)
    assert halves.take([2]) == ("é", 1)
