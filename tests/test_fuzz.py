"""Hostile or broken input to the decoders and the magic's argument parser: clear errors only,
no hangs, no other exceptions."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring

from celery_nb.magics import CeleryDockerMagics, names_flag
from celery_nb.options import JobOptions
from celery_nb_runtime import protocol, runner

FUZZ = settings(max_examples=300, deadline=None)


@FUZZ
@given(st.binary(max_size=512))
def test_bundle_decoder_rejects_garbage_clearly(data: bytes) -> None:
    try:
        header, sections = protocol.unpack_bundle(data)
    except protocol.ProtocolError:
        return
    assert isinstance(header, dict) and all(isinstance(s, memoryview) for s in sections)


@FUZZ
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_frame_decoder_rejects_garbage_clearly(data: bytes, chunk: int) -> None:
    decoder = protocol.FrameDecoder()
    try:
        for i in range(0, len(data), chunk):
            for kind, body in decoder.feed(data[i:i + chunk]):
                assert kind in protocol.FRAME_KINDS and isinstance(body, bytes)
    except protocol.ProtocolError:
        pass


frames = st.lists(st.tuples(st.sampled_from(protocol.FRAME_KINDS), st.binary(max_size=64)), max_size=8)


@FUZZ
@given(frames, st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=20))
def test_the_runtime_relays_frames_intact_however_they_are_split(frames: list, cuts: list) -> None:
    frames = [(kind, b"" if kind == protocol.FRAME_KEPT else body) for kind, body in frames]
    stream = b"".join(protocol.frame_header(kind, len(body)) + body for kind, body in frames)
    relayed = b"".join(protocol.frame_header(kind, len(body)) + body for kind, body in frames
                       if kind != protocol.FRAME_KEPT)  # (the server's own: not relayed)

    class Sink:
        data = bytearray()

        def write_raw(self, chunk: memoryview) -> None:
            self.data += bytes(chunk)

    relay = runner._ChildRelay.__new__(runner._ChildRelay)
    relay._frames, relay._logs, relay._frame_left, relay._head = Sink(), {}, 0, b""
    relay._out, relay._out_size, relay._stays = [], 0, False
    relay._frames.data = bytearray()
    pos, i = 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        relay._relay_frames(stream[pos:pos + step])
        relay._flush()
        pos, i = pos + step, i + 1
    assert bytes(relay._frames.data) == relayed
    assert relay._stays == any(kind == protocol.FRAME_KEPT for kind, _body in frames)


@FUZZ
@given(st.text(max_size=80))
def test_magic_arguments_give_usage_errors_only(line: str) -> None:
    try:
        args = parse_argstring(CeleryDockerMagics.celery_docker, line)
        names_flag(args.inputs)
        names_flag(args.outputs)
        JobOptions.from_flags(vars(args))
    except (UsageError, ValueError):
        pass


@pytest.mark.parametrize("line", ["--memory", "--timeout abc", "--in 'a b'", "--env NOEQUALS", "--bogus"])
def test_bad_magic_lines_are_explained(line: str) -> None:
    with pytest.raises((UsageError, ValueError)):
        args = parse_argstring(CeleryDockerMagics.celery_docker, line)
        names_flag(args.inputs)
        JobOptions.from_flags(vars(args))
