from __future__ import annotations

from limbic.monitors.text_stream import TextStream

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


BYTES = [b"caf", b"\xc3", b"\xa9", b" au", b" lait"]  # byte-level tokens, as GPT-2-style tokenizers have


def decode_bytes(ids):
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def test_incomplete_utf8_is_held_back():
    stream = TextStream(decode_bytes)
    out = [stream.push(i) for i in range(len(BYTES))]
    assert out == ["caf", "", "é", " au", " lait"]


def test_an_incomplete_character_at_the_end_is_flushed_as_a_full_decode_shows_it():
    stream = TextStream(decode_bytes)
    assert [stream.push(i) for i in (0, 1)] == ["caf", ""]
    assert stream.flush() == "\ufffd"


def test_each_push_decodes_a_short_window_not_the_whole_sequence():
    seen = []

    def counting(ids):
        seen.append(len(ids))
        return decode(ids)

    stream = TextStream(counting)
    for _ in range(200):
        stream.push(1)  # "lo" again and again
    assert max(seen) <= 2
    assert stream.flush() == ""  # everything was already released


def test_the_window_decodes_like_the_real_tokenizer(default_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    text = "Ünïcödé, emoji 🙂🚀 and CJK 漢字 — spaced   out\n\nnew lines."
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(lambda window: tokenizer.decode(window, skip_special_tokens=True))
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tokenizer.decode(ids)


def test_min_tokens_holds_off_stop_strings_and_stop_tokens():
    from limbic.monitors.engine import SamplingParams
    from limbic.monitors.text_stream import Generation

    params = SamplingParams(max_tokens=10, stop=("lo",), min_tokens=3, stop_token_ids=(5,))
    generation = Generation(decode, params, eos_token_ids={6})
    # "lo" completes at token 1 (inside min_tokens): no stop; then token 5 is a stop token (past min_tokens).
    outputs = [generation.push(i) for i in (0, 1, 2, 5)]
    assert [f for _, f in outputs] == [None, None, None, "stop"]
    assert "".join(d for d, _ in outputs) == "Hello wor"


def test_stop_token_ids_end_even_with_ignore_eos_and_eos_does_not():
    from limbic.monitors.engine import SamplingParams
    from limbic.monitors.text_stream import Generation

    generation = Generation(decode, SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(3,)), {2})
    assert generation.push(2) == (" wor", None)  # EOS ignored: ordinary text
    assert generation.push(3)[1] == "stop"


def generation_of(**params):
    from limbic.monitors.engine import SamplingParams
    from limbic.monitors.text_stream import Generation

    return Generation(decode, SamplingParams(**({"max_tokens": 10} | params)), eos_token_ids={6})


def run_generation(generation, ids):
    outputs = []
    for token in ids:
        outputs.append(generation.push(token))
        if outputs[-1][1] is not None:
            break
    return "".join(d for d, _ in outputs), outputs[-1][1], len(outputs)


def test_eos_stops_counted_and_scored_but_adds_no_text():
    assert run_generation(generation_of(), [0, 1, 6, 2]) == ("Hello", "stop", 3)


def test_ignore_eos_reads_eos_as_text_and_runs_to_length():
    text, finish, count = run_generation(generation_of(ignore_eos=True, max_tokens=3), [0, 6, 1, 2])
    assert (text, finish, count) == ("Hel" + PIECES[6] + "lo", "length", 3)


def test_length_releases_what_a_stop_prefix_held_back():
    # " wor" could begin the stop string " world!": held back, then released when max_tokens ends the run.
    assert run_generation(generation_of(stop=(" world!",), max_tokens=3), [0, 1, 2]) == ("Hello wor", "length", 3)


def test_a_stop_string_inside_one_token_cuts_the_token():
    assert run_generation(generation_of(stop=("l",)), [0, 1]) == ("He", "stop", 1)
