//! Peer identities and the policy of whom to take work from.

mod identity;
mod policy;

pub use identity::{load_identity_file, load_or_create_identity, IdentityError, IDENTITY_FILE};
pub use policy::PeerPolicy;
