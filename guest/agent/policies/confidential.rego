# The reference guest's built-in policy on a confidential guest (coco-shim).
#
# On a TEE the host is the adversary: this default admits what a pod needs and nothing that
# lets the host reach into it. Initdata's policy.rego replaces it (the attested path); the host
# cannot replace it with SetPolicy. Kata's contract: one rule per request message, input = the
# request as kata's agent serialises it.
#
# Whatever the policy says, the agent itself keeps CopyFile targets, storage mount points and
# container roots beneath /run/kata-containers, never through a symlink.
package agent_policy

import future.keywords.every
import future.keywords.if
import future.keywords.in

# Denied: the host running commands in, copying files into, or re-policing the pod, and the
# host's clock.
default ExecProcessRequest := false
default CopyFileRequest := false
default SetPolicyRequest := false
default SetGuestDateTimeRequest := false

# Allowed when every storage is one the guest provides itself (see below).
default CreateSandboxRequest := false
default CreateContainerRequest := false

# What a pod's life needs.
default AddARPNeighborsRequest := true
default CloseStdinRequest := true
default DestroySandboxRequest := true
default GetMetricsRequest := true
default GetOOMEventRequest := true
default GuestDetailsRequest := true
default ListInterfacesRequest := true
default ListRoutesRequest := true
default PauseContainerRequest := true
default ReadStreamRequest := true
default RemoveContainerRequest := true
default ResumeContainerRequest := true
default SignalProcessRequest := true
default StartContainerRequest := true
default StatsContainerRequest := true
default TtyWinResizeRequest := true
default UpdateContainerRequest := true
default UpdateInterfaceRequest := true
default UpdateRoutesRequest := true
default WaitProcessRequest := true
default WriteStreamRequest := true

default AllowRequestsFailingPolicy := false

CreateSandboxRequest if {
    every storage in input.storages {
        guest_storage(storage)
    }
}

CreateContainerRequest if {
    every storage in input.storages {
        guest_storage(storage)
    }
    count(input.devices) == 0
}

# Storages whose content the guest makes itself: the image it pulls and verifies, and empty
# directories. 9p, virtio-fs, bind and block storages bring host-chosen content: refused.
guest_storage(storage) if {
    storage.driver in policy_data.guest_storage_drivers
}

policy_data := {
    "guest_storage_drivers": ["image_guest_pull", "ephemeral", "local"],
}
