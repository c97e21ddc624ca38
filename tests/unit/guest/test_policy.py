"""The agent policy on kata's contract, with the real Rego engine (regorus)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.message import Message

from guest.agent.errors import InvalidArgument
from guest.agent.policy import (
    AllowAll,
    DeferredPolicy,
    RegoPolicy,
    confidential_default,
    deferred_confidential_default,
)
from guest.agent.policy_input import request_input, rule_name
from guest.agent.rego import RegoError
from protocols.api.kata import agent_pb2, oci_pb2, types_pb2

REPO = Path(__file__).resolve().parents[3]
HEAD = "package agent_policy\n\nimport future.keywords.if\nimport future.keywords.in\n\n"

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
REQUEST_TYPES = sorted({m.input_type.name for m in AGENT_SERVICE.methods})


def request_of(name: str) -> Message:
    cls: type[Message] = getattr(agent_pb2, name)
    return cls()


def policy(body: str) -> RegoPolicy:
    return RegoPolicy(HEAD + body, origin="test")


@pytest.mark.parametrize("name", REQUEST_TYPES)
def test_each_request_is_decided_by_the_rule_named_after_its_message(name: str) -> None:
    other = "ExecProcessRequest" if name != "ExecProcessRequest" else "CopyFileRequest"
    p = policy(f"default {name} := false\ndefault {other} := false\n{name} := true\n")
    assert rule_name(request_of(name)) == name
    assert p.decide(request_of(name)).allowed
    assert not p.decide(request_of(other)).allowed


def test_input_is_the_request_the_way_kata_serialises_it() -> None:
    request = agent_pb2.UpdateInterfaceRequest(
        interface=types_pb2.Interface(
            device="eth0",
            name="eth0",
            IPAddresses=[types_pb2.IPAddress(family=types_pb2.v6, address="fe80::1", mask="64")],
            mtu=1500,
            hwAddr="02:00:00:00:00:01",
            type="veth",
        )
    )
    assert request_input(request) == {
        "interface": {
            "device": "eth0",
            "name": "eth0",
            "IPAddresses": [{"family": 1, "address": "fe80::1", "mask": "64"}],  # enum: number
            "mtu": 1500,
            "hwAddr": "02:00:00:00:00:01",
            "devicePath": "",  # unset scalars: their defaults
            "type_": "veth",  # a Rust keyword gets rust-protobuf's trailing underscore
            "raw_flags": 0,
        }
    }
    create = request_input(
        agent_pb2.CreateContainerRequest(
            container_id="c1",
            OCI=oci_pb2.Spec(
                Version="1.1.0",
                Annotations={"io.kubernetes.cri.sandbox-name": "busybox"},
                Mounts=[oci_pb2.Mount(destination="/proc", type="proc", source="proc")],
            ),
        )
    )
    assert create["string_user"] is None  # unset message: null
    assert create["storages"] == [] and create["sandbox_pidns"] is False
    assert create["OCI"]["Annotations"] == {"io.kubernetes.cri.sandbox-name": "busybox"}
    assert create["OCI"]["Mounts"][0]["type_"] == "proc"
    assert create["OCI"]["Process"] is None and create["OCI"]["Version"] == "1.1.0"
    write = request_input(agent_pb2.WriteStreamRequest(container_id="c", data=b"hi"))
    assert write["data"] == [104, 105]  # bytes: an array of numbers (serde's Vec<u8>)
    json.dumps(create)  # plain JSON all the way down


def test_copy_file_input_is_katas_policy_copy_file_request() -> None:
    link = agent_pb2.CopyFileRequest(
        path="/run/kata-containers/shared/containers/x/..data",
        file_mode=stat.S_IFLNK | 0o777,
        data=b"..2025_01",
        uid=-1,
    )
    assert request_input(link) == {
        "path": "/run/kata-containers/shared/containers/x/..data",
        "file_type": "Symlink",
        "symlink_target": "..2025_01",
        "file_size": 0,
        "file_mode": stat.S_IFLNK | 0o777,
        "dir_mode": 0,
        "uid": -1,
        "gid": 0,
        "offset": 0,
    }
    regular = request_input(agent_pb2.CopyFileRequest(path="/f", file_mode=0o100644, data=b"x"))
    assert regular["file_type"] == "Regular" and regular["symlink_target"] is None
    assert "data" not in regular
    with pytest.raises(InvalidArgument, match="UTF-8"):
        request_input(agent_pb2.CopyFileRequest(file_mode=stat.S_IFLNK, data=b"\xff\xfe"))


def test_booleans_in_the_input_stay_booleans() -> None:
    p = policy(
        "default CreateSandboxRequest := false\n"
        "CreateSandboxRequest if {\n    input.sandbox_pidns == false\n}\n"
    )
    assert p.decide(agent_pb2.CreateSandboxRequest(sandbox_pidns=False)).allowed
    assert not p.decide(agent_pb2.CreateSandboxRequest(sandbox_pidns=True)).allowed


def test_policy_data_feeds_the_rules() -> None:
    p = policy(
        "default ExecProcessRequest := false\n"
        "ExecProcessRequest if {\n"
        "    some allowed in policy_data.allowed_commands\n"
        "    input.process.Args == allowed\n"
        "}\n"
        'policy_data := {"allowed_commands": [["cat", "/etc/hostname"]]}\n'
    )

    def exec_request(*args: str) -> agent_pb2.ExecProcessRequest:
        return agent_pb2.ExecProcessRequest(container_id="c", process=oci_pb2.Process(Args=args))

    assert p.decide(exec_request("cat", "/etc/hostname")).allowed
    assert not p.decide(exec_request("sh")).allowed


STATEFUL = (
    "default CreateContainerRequest := false\n"
    "default ExecProcessRequest := false\n"
    'CreateContainerRequest := {"allowed": true, "ops": ops} if {\n'
    "    not data.pstate[input.container_id]\n"
    '    ops := [{"op": "add", "path": concat("", ["/pstate/", input.container_id]),'
    ' "value": input.OCI.Hostname}]\n'
    "}\n"
    "ExecProcessRequest if {\n"
    '    data.pstate[input.container_id] == "allowed-host"\n'
    "}\n"
)


def test_ops_update_the_state_between_calls() -> None:
    p = policy(STATEFUL)

    def create(cid: str, host: str) -> agent_pb2.CreateContainerRequest:
        return agent_pb2.CreateContainerRequest(container_id=cid, OCI=oci_pb2.Spec(Hostname=host))

    exec_c1 = agent_pb2.ExecProcessRequest(container_id="c1")
    assert not p.decide(exec_c1).allowed
    assert p.decide(create("c1", "allowed-host")).allowed
    assert p.engine.data == {"pstate": {"c1": "allowed-host"}}
    assert p.decide(exec_c1).allowed  # the state the create recorded
    assert not p.decide(create("c1", "again")).allowed  # denied: its ops are not applied
    assert p.engine.data == {"pstate": {"c1": "allowed-host"}}


def test_ops_that_do_not_apply_are_an_error() -> None:
    p = policy(
        "default StartContainerRequest := false\n"
        'StartContainerRequest := {"allowed": true, "ops": [{"op": "remove", "path": "/nope"}]}\n'
    )
    with pytest.raises(RegoError, match="state operations"):
        p.decide(agent_pb2.StartContainerRequest(container_id="c"))


def test_a_rule_of_the_wrong_shape_is_an_error() -> None:
    p = policy('StartContainerRequest := "yes"\n')
    with pytest.raises(RegoError, match="not a bool"):
        p.decide(agent_pb2.StartContainerRequest())


def test_denials_name_the_rule_the_expression_and_the_request_field() -> None:
    p = policy(
        "default CreateSandboxRequest := false\n"
        "default ExecProcessRequest := false\n"
        "default StartContainerRequest := false\n"
        "\n"
        "CreateSandboxRequest if {\n"
        "    count(input.kernel_modules) == 0\n"
        "    i_pidns := input.sandbox_pidns\n"
        "    i_pidns == false\n"
        "    small_enough(input.storages)\n"
        "}\n"
        "\n"
        "small_enough(storages) if {\n"
        "    count(storages) < 2\n"
        "}\n"
        "\n"
        "StartContainerRequest if {\n"
        '    input.container_id == "allowed"\n'
        "}\n"
        "StartContainerRequest if {\n"
        '    startswith(input.container_id, "ok-")\n'
        "}\n"
    )
    # the rule's default is all there is
    reason = p.decide(agent_pb2.ExecProcessRequest()).reason
    assert reason == (
        "rule ExecProcessRequest: its default `default ExecProcessRequest := false` "
        "(policy.rego:7) holds"
    )
    # a value bound from the input, compared later
    reason = p.decide(agent_pb2.CreateSandboxRequest(sandbox_pidns=True)).reason
    assert "rule CreateSandboxRequest: failed at policy.rego:13 `i_pidns == false`" in reason
    assert "(request field: input.sandbox_pidns)" in reason
    # a helper that fails: named, with the expression inside it
    storage = agent_pb2.Storage(driver="local", mount_point="/run/kata-containers/x")
    reason = p.decide(agent_pb2.CreateSandboxRequest(storages=[storage, storage])).reason
    assert "policy.rego:14 `small_enough(input.storages)` (request field: input.storages)" in reason
    assert "← small_enough failed at policy.rego:18 `count(storages) < 2`" in reason
    # every body of a rule, each where it stopped
    reason = p.decide(agent_pb2.StartContainerRequest(container_id="nope")).reason
    assert 'policy.rego:22 `input.container_id == "allowed"`' in reason
    assert '; or at policy.rego:25 `startswith(input.container_id, "ok-")`' in reason
    assert "(request field: input.container_id)" in reason


def test_a_request_without_a_rule_is_denied_saying_so() -> None:
    p = policy("default ExecProcessRequest := true\n")
    decision = p.decide(agent_pb2.CopyFileRequest(path="/x"))
    assert not decision.allowed
    assert decision.reason == "the policy has no rule CopyFileRequest (nor a default): denied"


def test_allow_requests_failing_policy_turns_denials_into_passes() -> None:
    p = policy("default AllowRequestsFailingPolicy := true\ndefault ExecProcessRequest := false\n")
    assert p.allow_failures
    decision = p.decide(agent_pb2.ExecProcessRequest())
    assert decision.allowed
    assert decision.reason.startswith("AllowRequestsFailingPolicy (would be blocked: rule Exec")
    assert p.decide(agent_pb2.CopyFileRequest()).allowed  # even a request with no rule
    assert not policy("default ExecProcessRequest := true\n").allow_failures


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "package agent_policy"),
        ("package other\ndefault X := true\n", "package agent_policy"),
        (
            HEAD + "ExecProcessRequest if {\n    input.x ==\n}\n",
            r"does not compile:\n--> policy.rego:8:1(.|\n)*expecting expression",
        ),
        (HEAD + "ExecProcessRequest if {\n    input.x == [a |\n}\n", "does not compile"),
    ],
)
def test_bad_policies_are_invalid_arguments(text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        RegoPolicy(text, origin="test")


def test_genpolicy_style_multi_line_array_comprehension() -> None:
    """The construct regopy 1.5.2 fails to parse in kata genpolicy's rules.rego."""
    p = policy(
        'PREFIX := "cdi.k8s.io/vfio"\n'
        "default CreateContainerRequest := false\n"
        "suffixes(annotations) := [suffix |\n"
        "    some key, _ in annotations\n"
        "    startswith(key, PREFIX)\n"
        "    suffix := trim_prefix(key, PREFIX)\n"
        '    regex.match("^[0-9]+$", suffix)\n'
        "]\n"
        "CreateContainerRequest if {\n"
        '    suffixes(input.OCI.Annotations) == ["0"]\n'
        "}\n"
    )
    annotations = {"cdi.k8s.io/vfio0": "x", "cdi.k8s.io/vfiox": "y", "other": "z"}
    request = agent_pb2.CreateContainerRequest(OCI=oci_pb2.Spec(Annotations=annotations))
    assert p.decide(request).allowed


def test_the_development_default_allows_everything_without_an_engine() -> None:
    assert AllowAll().decide(agent_pb2.ExecProcessRequest()).allowed


def test_the_agent_imports_no_rego_engine_until_a_policy_needs_it() -> None:
    probe = (
        "import sys, guest.agent.__main__, guest.agent.service\n"
        "assert 'regorus' not in sys.modules and 'jsonpatch' not in sys.modules\n"
        "from guest.agent.policy import confidential_default\n"
        "confidential_default()\n"
        "assert 'regorus' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True)


def test_a_deferred_policy_is_never_skipped_and_compiles_once() -> None:
    made: list[int] = []

    def make() -> RegoPolicy:
        made.append(1)
        return confidential_default()

    deferred = DeferredPolicy("built-in confidential default", make)
    assert not deferred.loaded and not made
    exec_request = agent_pb2.ExecProcessRequest(container_id="c")
    assert not deferred.decide(exec_request).allowed  # compiled on demand, then decided
    assert deferred.loaded and made == [1]
    assert deferred.load() is deferred.load() and made == [1]
    assert deferred_confidential_default().origin == confidential_default().origin


def test_a_confidential_agent_listens_before_the_engine_loads() -> None:
    """prepare() settles the confidential default without importing the engine; the agent's
    import thread imports it, and the loop's thread compiles it (regorus objects are
    unsendable: they must be made on the thread that uses them)."""
    probe = (
        "import sys, threading\n"
        "from guest.agent.__main__ import import_machinery, parse_args, prepare\n"
        "from guest.agent.initdata import NoTee\n"
        "from protocols.api.kata import agent_pb2\n"
        "args = parse_args(['--unix', '/nonexistent', '--confidential'])\n"
        "startup = prepare(args, NoTee())\n"
        "assert 'regorus' not in sys.modules and not startup.policy.loaded\n"
        "t = threading.Thread(target=import_machinery, args=(startup.policy,))\n"
        "t.start(); t.join()\n"
        "assert 'regorus' in sys.modules and not startup.policy.loaded\n"
        "startup.policy.load()\n"
        "assert not startup.policy.decide(agent_pb2.ExecProcessRequest()).allowed\n"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True)


# -- the confidential default -----------------------------------------------------------------


def storage(driver: str) -> agent_pb2.Storage:
    return agent_pb2.Storage(driver=driver, source="s", mount_point="/run/kata-containers/c/rootfs")


@pytest.fixture(scope="module")
def confidential() -> RegoPolicy:
    return confidential_default()


@pytest.mark.parametrize(
    "request_",
    [
        agent_pb2.ExecProcessRequest(container_id="c", process=oci_pb2.Process(Args=["sh"])),
        agent_pb2.CopyFileRequest(path="/run/kata-containers/shared/x", file_mode=0o100644),
        agent_pb2.SetPolicyRequest(policy="package agent_policy\n"),
        agent_pb2.SetGuestDateTimeRequest(Sec=1),
        *(
            agent_pb2.CreateContainerRequest(container_id="c", storages=[storage(d)])
            for d in ("9p", "virtio-fs", "bind", "blk", "virtio-blk", "mmioblk")
        ),
        agent_pb2.CreateSandboxRequest(storages=[storage("9p")]),
        agent_pb2.CreateContainerRequest(
            storages=[storage("image_guest_pull")], devices=[agent_pb2.Device(id="/dev/vdb")]
        ),
    ],
    ids=lambda r: f"{rule_name(r)}-{[s.driver for s in getattr(r, 'storages', [])]}",
)
def test_the_confidential_default_denies_what_lets_the_host_in(
    confidential: RegoPolicy, request_: Message
) -> None:
    decision = confidential.decide(request_)
    assert not decision.allowed, decision


@pytest.mark.parametrize(
    "request_",
    [
        agent_pb2.CreateSandboxRequest(hostname="pod", storages=[storage("ephemeral")]),
        agent_pb2.CreateContainerRequest(
            container_id="c", storages=[storage("image_guest_pull"), storage("local")]
        ),
        agent_pb2.CreateContainerRequest(container_id="pause"),
        agent_pb2.StartContainerRequest(container_id="c"),
        agent_pb2.ReadStreamRequest(container_id="c"),
        agent_pb2.WriteStreamRequest(container_id="c", data=b"stdin"),
        agent_pb2.WaitProcessRequest(container_id="c"),
        agent_pb2.SignalProcessRequest(container_id="c", signal=15),
        agent_pb2.UpdateInterfaceRequest(),
        agent_pb2.UpdateRoutesRequest(),
        agent_pb2.AddARPNeighborsRequest(),
        agent_pb2.StatsContainerRequest(container_id="c"),
        agent_pb2.RemoveContainerRequest(container_id="c"),
        agent_pb2.DestroySandboxRequest(),
        agent_pb2.GuestDetailsRequest(),
        agent_pb2.GetOOMEventRequest(),
    ],
    ids=rule_name,
)
def test_the_confidential_default_allows_what_a_pod_needs(
    confidential: RegoPolicy, request_: Message
) -> None:
    assert confidential.decide(request_).allowed


def test_a_denied_host_storage_names_the_driver_field(confidential: RegoPolicy) -> None:
    reason = confidential.decide(
        agent_pb2.CreateContainerRequest(container_id="c", storages=[storage("9p")])
    ).reason
    assert "rule CreateContainerRequest: failed at confidential.rego:" in reason
    assert "guest_storage failed at confidential.rego:" in reason
    assert "`storage.driver in policy_data.guest_storage_drivers`" in reason
