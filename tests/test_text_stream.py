from __future__ import annotations

from monitors.text_stream import TextStream

PIECES = ["Hel", "lo", " wor", "ld", "\n\n", "Next", " line"]


def decode(ids):
    return "".join(PIECES[i] for i in ids)


def run(stop):
    stream = TextStream(decode, stop)
    out = []
    for i in range(len(PIECES)):
        out.append(stream.push(i))
        if stream.stopped:
            break
    return out, stream


def test_without_stops_everything_is_released_in_order():
    out, stream = run(())
    assert "".join(out) + stream.flush() == "".join(PIECES)


def test_stop_string_across_tokens_truncates_and_is_never_emitted():
    out, stream = run(["\n\nNext"])
    assert "".join(out) == "Hello world" and stream.stopped


def test_partial_stop_prefix_is_held_then_released():
    out, stream = run(["ld!"])
    assert not stream.stopped
    assert "".join(out) + stream.flush() == "".join(PIECES)
    assert out[3] == ""  # "ld" might have started "ld!"


def test_incomplete_utf8_is_held_back():
    pieces = ["caf", "\ufffd", "é"]
    stream = TextStream(lambda ids: "caf" + ("é" if len(ids) == 3 else "\ufffd" * (len(ids) - 1)))
    out = [stream.push(i) for i in range(len(pieces))]
    assert out == ["caf", "", "é"]
