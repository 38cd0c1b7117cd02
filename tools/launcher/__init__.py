"""Starting and stopping the processes of a local Cloudach stack (tests and `cloudach up`)."""
