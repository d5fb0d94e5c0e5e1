//! The Podman implementation of the runtime.
