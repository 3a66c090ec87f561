"""Hot upgrade and failover: handing the daemon's state and its FUSE fd to a supervisor and back."""
