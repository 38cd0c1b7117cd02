"""gRPC plumbing shared by every Cloudach service: the error policy and the server scaffold."""
