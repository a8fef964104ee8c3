//! The notifier: gRPC server streams that push events to agents and deployers.
