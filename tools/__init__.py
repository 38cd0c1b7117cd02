"""What stands on top of the services: the `cloudach` command, the launcher of the local stack,
and the generation of the gRPC stubs. Nothing below (cloudach/, the services) imports it."""
