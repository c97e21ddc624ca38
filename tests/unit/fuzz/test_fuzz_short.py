"""The short form of ``make fuzz`` that stays in ``make test``: hypothesis drives the same
targets (tests/fuzz/targets.py) with structured inputs — well-formed frames, envelopes and
runtime options with hostile fields — where random bytes rarely get past the first check."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.ttrpc.frame import FrameType, encode_header
from tests.fuzz import targets

SHORT = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
uint32 = st.integers(min_value=0, max_value=2**32 - 1)
frame_type = st.sampled_from([FrameType.REQUEST, FrameType.RESPONSE, FrameType.DATA, 0, 4, 255])
flags = st.integers(min_value=0, max_value=255)
text = st.text(max_size=40)
garbage = st.binary(max_size=64)
# A header claiming up to 4 GiB: the decoder must skip it as it arrives, never allocate it.
huge_header = st.builds(encode_header, st.sampled_from([2**32 - 1, (4 << 20) + 1, 65]),
                        uint32, frame_type, flags)


@st.composite
def frames(draw: st.DrawFn, stream_ids: st.SearchStrategy[int],
           payloads: st.SearchStrategy[bytes]) -> bytes:
    parts = []
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        kind = draw(st.sampled_from(["frame", "garbage", "huge"]))
        if kind == "frame":
            data = draw(payloads)
            parts.append(encode_header(len(data), draw(stream_ids), draw(frame_type),
                                       draw(flags)) + data)
        elif kind == "huge":
            parts.append(draw(huge_header) + draw(garbage))
        else:
            parts.append(draw(garbage))
    return b"".join(parts)


services = st.sampled_from([targets.ECHO, targets.TASK, "", "nope.v1.X"])
methods = st.sampled_from(["Echo", "Fail", "Crash", "Deadline", "Create", "State", "Kill",
                           "Delete", "Exec", "Nope", ""])


json_bodies = st.one_of(
    st.builds(lambda d: ("[" * d + "]" * d).encode(), st.integers(min_value=1, max_value=20000)),
    st.builds(lambda d: ('{"a":' * d + "1" + "}" * d).encode(),
              st.integers(min_value=1, max_value=20000)),
    st.sampled_from([b'{"args": ["sh"]}', b"[]", b"null", b"{", b"\xff"]),
)


@st.composite
def task_requests(draw: st.DrawFn) -> bytes:
    """Task requests the shim's edge translates: JSON in Exec's spec and Update's resources,
    runtime options in Create."""
    from google.protobuf import any_pb2

    from protocols.api.containerd.task.v3 import shim_pb2 as task_v3

    body = any_pb2.Any(type_url=draw(st.sampled_from(["types.containerd.io/opencontainers/"
                                                      "runtime-spec/1/Process", "x"])),
                       value=draw(json_bodies))
    method, message = draw(st.sampled_from([
        ("Exec", task_v3.ExecProcessRequest(id="c", exec_id="e", spec=body)),
        ("Update", task_v3.UpdateTaskRequest(id="c", resources=body)),
        ("Create", task_v3.CreateTaskRequest(id="c", bundle="/nonexistent", options=any_pb2.Any(
            type_url="runtimeoptions.v1.Options", value=draw(garbage)))),
    ]))
    return targets.request_frame(1, targets.TASK, method, message.SerializeToString())


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        stream_id = draw(st.one_of(st.integers(min_value=0, max_value=12), uint32))
        if draw(st.booleans()):
            parts.append(targets.request_frame(
                stream_id, draw(services), draw(methods), draw(garbage),
                timeout_nano=draw(st.integers(min_value=-(2**63), max_value=2**63 - 1))))
        else:
            parts.append(draw(frames(st.just(stream_id), garbage)))
    return b"".join(parts)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        stream_id = draw(st.sampled_from([1, 3, 5, 7, 0, 2, 2**32 - 1]))
        if draw(st.booleans()):
            parts.append(targets.response_frame(
                stream_id, draw(int32), draw(text), draw(garbage), draw(frame_type)))
        else:
            parts.append(draw(frames(st.just(stream_id), garbage)))
    return b"".join(parts)


def nested(depth: int, opener: str, closer: str) -> str:
    return "a = " + opener * depth + "1" + closer * depth


config_bodies = st.one_of(
    st.builds(lambda p, v, e: (f'[shim]\nprotocol = {p}\nbootstrap_version = {v}\n'
                               f'early_boot = {e}\n').encode(),
              st.sampled_from(['"ttrpc"', '"grpc"', '"auto"', "1", "[]", '"x"']),
              st.sampled_from(["2", "3", '"auto"', "true", "4", "{}"]),
              st.sampled_from(["true", "false", '"yes"', "0"])),
    st.builds(lambda d, o: nested(d, *o).encode(), st.integers(min_value=1, max_value=4000),
              st.sampled_from([("[", "]"), ("{b = ", "}")])),
    st.builds(lambda t: f"[hypervisor]\ntee = {t}\n[runtime]\n".encode(),
              st.sampled_from(['"none"', '"snp"', "3", '"x"'])),
    st.text(max_size=80).map(str.encode),
    st.binary(max_size=80),
)
type_urls = st.sampled_from(["runtimeoptions.v1.Options",
                             "type.googleapis.com/runtimeoptions.v1.Options", "other", ""])


@st.composite
def runtime_options(draw: st.DrawFn) -> bytes:
    from google.protobuf import any_pb2

    from protocols.api.runtimeoptions.v1 import api_pb2

    options = api_pb2.Options(type_url=draw(text), config_body=draw(config_bodies))
    data = any_pb2.Any(type_url=draw(type_urls), value=options.SerializeToString())
    encoded = data.SerializeToString()
    cut = draw(st.integers(min_value=0, max_value=len(encoded)))
    return encoded[:cut] + draw(garbage) if draw(st.booleans()) else encoded


@SHORT
@given(seed=st.integers(min_value=0, max_value=255),
       data=frames(st.one_of(uint32, st.integers(min_value=0, max_value=9)), garbage))
def test_frame_decoder(seed: int, data: bytes) -> None:
    targets.fuzz_frame(bytes([seed]) + data)


@SHORT
@given(data=requests())
def test_server_request_path(data: bytes) -> None:
    targets.fuzz_server(data)


@SHORT
@given(data=task_requests())
def test_task_edge_request_path(data: bytes) -> None:
    targets.fuzz_server(data)


@SHORT
@given(data=responses())
def test_client_receive_path_from_a_hostile_agent(data: bytes) -> None:
    targets.fuzz_client(data)


@SHORT
@given(data=runtime_options())
def test_start_stdin(data: bytes) -> None:
    targets.fuzz_start_stdin(data)


@SHORT
@given(data=runtime_options())
def test_runtime_options(data: bytes) -> None:
    targets.fuzz_runtime_options(data)


def test_seeds_pass_every_target() -> None:
    for name, target in targets.TARGETS.items():
        for seed in targets.seeds(name):
            target(seed)
