//! Peer identities, whom to trust, and the proofs trust rests on: join tokens,
//! owner-signed assignments and replay protection.

pub mod dial;
pub mod group;
mod identity;
pub mod join;
mod policy;
pub mod replay;
pub mod statement;
pub mod store;

pub use identity::{
    load_identity_file, load_or_create_identity, load_or_create_key, load_psk_file, loose_mode,
    IdentityError, CLIENT_KEY_FILE, IDENTITY_FILE,
};
pub use policy::TrustedPeers;

#[doc(hidden)]
pub use identity::decode_key;
