"""Streaming detokenization and stop strings."""

from diptych.text.detokenize import StopMatcher, StreamDecoder


class ByteTokenizer:
    """Every id is one byte; 256 is a special token."""

    def is_special(self, i):
        return i == 256

    def token_bytes(self, i):
        return bytes([i])


def test_utf8_characters_are_never_split():
    text = "héllo 中文 👩‍👩‍👧 ok"
    dec = StreamDecoder(ByteTokenizer())
    pieces = [dec.push(b) for b in text.encode()] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # no character was decoded from a part
    # a 4-byte character: nothing comes out until its last byte arrives
    assert [dec.push(b) for b in "👩".encode()] == ["", "", "", "👩"]
    assert dec.push(256) == ""


def test_invalid_bytes_become_replacement_characters_not_errors():
    dec = StreamDecoder(ByteTokenizer())
    out = "".join(dec.push(b) for b in b"a\xffb\xe4") + dec.flush()
    assert out == "a\ufffdb\ufffd"


def feed_all(stops, chunks):
    m = StopMatcher(stops)
    out, stopped = [], False
    for c in chunks:
        text, stopped = m.feed(c)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped


def test_stop_string_split_over_pieces_is_cut_and_never_shown():
    assert feed_all(["</s>"], ["Hello <", "/", "s> more"]) == ("Hello ", True)


def test_partial_match_that_fails_is_released():
    assert feed_all(["STOP"], ["a ST", "ART b"]) == ("a START b", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(["cd", "b"], ["abcd"]) == ("a", True)


def test_no_stops_passes_through():
    assert feed_all([], ["x", "y"]) == ("xy", False)
