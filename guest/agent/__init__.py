"""The reference guest agent: a Kata-protocol (grpc.AgentService, grpc.Health) ttrpc server."""
