"""Cheap pieces every room of the shim shares (no protobuf, no grpc): the error table, the one
config loader, paths, the crash record, the timeouts table, the hand-made wire, state machines."""
