"""SetPolicy documents: the JSON format and the Rego `default` subset."""

from __future__ import annotations

import pytest

from guest.agent.errors import InvalidArgument
from guest.agent.policy import Policy


def test_allow_all_before_any_policy() -> None:
    assert Policy.allow_all().allows("ExecProcess", "ExecProcessRequest")


def test_json_default_and_rules() -> None:
    policy = Policy.parse(
        '{"default": "deny", "rules": {"ExecProcess": "allow", "ReadStreamRequest": true}}'
    )
    assert policy.allows("ExecProcess")
    assert policy.allows("ReadStdout", "ReadStreamRequest")
    assert not policy.allows("CreateContainer", "CreateContainerRequest")


def test_json_rpc_name_wins_over_request_name() -> None:
    policy = Policy.parse('{"default": "allow", "rules": {"ReadStderr": "deny"}}')
    assert not policy.allows("ReadStderr", "ReadStreamRequest")
    assert policy.allows("ReadStdout", "ReadStreamRequest")


@pytest.mark.parametrize(
    "document",
    [
        "",
        "{",
        "[]",
        '{"default": "maybe"}',
        '{"rules": []}',
        '{"extra": 1}',
        "package x\nallow { true }",
    ],
)
def test_bad_documents(document: str) -> None:
    with pytest.raises(InvalidArgument):
        Policy.parse(document)


def test_rego_defaults() -> None:
    rego = """
package agent_policy

default CreateContainerRequest := false
default ExecProcessRequest := true
default ReadStreamRequest = true

CreateContainerRequest if {
    input.OCI.Version == "1.1.0"
}
"""
    policy = Policy.parse(rego)
    assert policy.source_format == "rego"
    assert policy.allows("ExecProcess", "ExecProcessRequest")
    assert policy.allows("ReadStdout", "ReadStreamRequest")
    assert not policy.allows("CreateContainer", "CreateContainerRequest")  # body not evaluated
    assert not policy.allows("StartContainer", "StartContainerRequest")  # not listed: denied


def test_rego_allow_requests_failing_policy() -> None:
    policy = Policy.parse(
        "default AllowRequestsFailingPolicy := true\ndefault ExecProcessRequest := false\n"
    )
    assert policy.allows("ExecProcess", "ExecProcessRequest")
