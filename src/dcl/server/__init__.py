"""gRPC services, mutual TLS, ACL and the Backend seam (see dcl.server.server)."""
