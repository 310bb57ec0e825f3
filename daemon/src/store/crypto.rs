//! Envelope encryption for the call store, sans-IO: keys and nonces come in, bytes go out.
//!
//! - Every call has its own random 256-bit data key. HKDF-SHA256 derives one AES-256-GCM key
//!   per data class from it (masked transcript, unmasked transcript, audio); the store keeps
//!   only these class keys (wrapped), never the data key, so each class is shredded on its
//!   own schedule (audio after 30 days, the transcript after 180) and a key for one class
//!   opens nothing of another.
//! - A record's nonce is its kind, its index within the call and a last-chunk flag (the age
//!   format's STREAM construction): unique per key as long as each (call, kind, index) is
//!   encrypted from one final plaintext, which the store guarantees (records are
//!   append-only, the table's primary key refuses a second write, and an interrupted call
//!   is never written again).
//! - The AAD binds the call id, the kind and the index, so a ciphertext moved to another
//!   row, index or call fails to open, as does one flipped bit.
//! - Class keys are wrapped by the box's master key (AES-256-GCM, a random 96-bit nonce given
//!   by the caller; a few wraps per call keep random nonces far from their ~2^32 bound), the
//!   AAD binding the call id, the class and the master key's id. Deleting a wrapped key is
//!   erasure: without it no remaining copy of that class's ciphertext can be opened
//!   (crypto-shredding).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;

pub const KEY_BYTES: usize = 32;
pub const TAG_BYTES: usize = 16;
const DOMAIN: &[u8] = b"callbox/store/v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// Wrong key, or bytes changed, moved or truncated: AES-GCM cannot tell which.
    #[error("{what} does not authenticate (wrong key, or the bytes were changed or moved)")]
    Authentication { what: String },
    #[error("{0} is too short to be a sealed record")]
    TooShort(String),
}

/// What a record holds; part of its nonce and AAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// An utterance's masked text and what was understood of it.
    Utterance = 1,
    /// An utterance's unmasked text (only with `store.keep_unmasked`).
    Unmasked = 2,
    /// A chunk of a leg's audio (only with `store.keep_audio`).
    Audio = 3,
}

impl RecordKind {
    pub fn class(self) -> DataClass {
        match self {
            Self::Utterance => DataClass::Transcript,
            Self::Unmasked => DataClass::Unmasked,
            Self::Audio => DataClass::Audio,
        }
    }

    pub fn from_code(code: i64) -> Option<Self> {
        [Self::Utterance, Self::Unmasked, Self::Audio].into_iter().find(|k| *k as i64 == code)
    }
}

/// A data class: one derived key each, and its own retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataClass {
    Transcript,
    Unmasked,
    Audio,
}

impl DataClass {
    pub const ALL: [Self; 3] = [Self::Transcript, Self::Unmasked, Self::Audio];

    /// The class's name as stored (and as its HKDF info).
    pub fn name(self) -> &'static str {
        match self {
            Self::Transcript => "transcript",
            Self::Unmasked => "unmasked",
            Self::Audio => "audio",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// The master key: wraps every call's data key. Its id (not secret: the first 8 bytes of
/// SHA-256 over a domain label and the key) says which master key wrapped a data key.
pub struct MasterKey {
    key: LessSafeKey,
    id: String,
}

impl MasterKey {
    pub fn new(bytes: &[u8; KEY_BYTES]) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"callbox/master-key-id/v1");
        ctx.update(bytes);
        let id = crate::hex::encode(&ctx.finish().as_ref()[..8]);
        Self { key: aead_key(bytes), id }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// `nonce || ciphertext || tag` of a class key, bound to the call, the class and this
    /// master key.
    pub fn wrap(&self, call: &str, class: DataClass, key: &ClassKey, nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let mut out = key.bytes.to_vec();
        let aad = wrap_aad(call, class, &self.id);
        // Sealing only fails for inputs over GCM's ~64 GB limit; 32 bytes never are.
        if self.key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut out).is_err() {
            unreachable!("AES-GCM refused to seal 32 bytes");
        }
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&out);
        wrapped
    }

    pub fn unwrap(&self, call: &str, class: DataClass, wrapped: &[u8]) -> Result<ClassKey, CryptoError> {
        let what = || format!("the {} key of call {call}", class.name());
        if wrapped.len() != NONCE_LEN + KEY_BYTES + TAG_BYTES {
            return Err(CryptoError::TooShort(what()));
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::TooShort(what()))?;
        let mut buf = sealed.to_vec();
        let aad = wrap_aad(call, class, &self.id);
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(&aad), &mut buf)
            .map_err(|_| CryptoError::Authentication { what: what() })?;
        let mut bytes = [0u8; KEY_BYTES];
        bytes.copy_from_slice(plain);
        Ok(ClassKey::from_bytes(bytes))
    }
}

fn wrap_aad(call: &str, class: DataClass, master_id: &str) -> Vec<u8> {
    let mut aad = DOMAIN.to_vec();
    aad.extend_from_slice(b"/wrap");
    push_field(&mut aad, call.as_bytes());
    push_field(&mut aad, class.name().as_bytes());
    push_field(&mut aad, master_id.as_bytes());
    aad
}

fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u64).to_be_bytes());
    out.extend_from_slice(field);
}

fn aead_key(bytes: &[u8; KEY_BYTES]) -> LessSafeKey {
    // AES-256 takes any 32 bytes; from_... fails only on a wrong length, which the type rules out.
    match UnboundKey::new(&AES_256_GCM, bytes) {
        Ok(k) => LessSafeKey::new(k),
        Err(_) => unreachable!("AES-256-GCM refused a 32-byte key"),
    }
}

/// One call's data key (random, from the store's shell).
#[derive(Clone)]
pub struct DataKey {
    bytes: [u8; KEY_BYTES],
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(…)") // never the bytes, in a log or a panic message
    }
}

impl DataKey {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self { bytes }
    }

    /// The AES-256-GCM key of one data class of this call (HKDF-SHA256).
    pub fn class_key(&self, class: DataClass) -> ClassKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, DOMAIN).extract(&self.bytes);
        let info = [class.name().as_bytes()];
        let mut bytes = [0u8; KEY_BYTES];
        // expand/fill fail only when the output is over 255 × 32 bytes; one key is 32.
        if prk.expand(&info, OutputLen).and_then(|okm| okm.fill(&mut bytes)).is_err() {
            unreachable!("HKDF refused a 32-byte output");
        }
        ClassKey::from_bytes(bytes)
    }
}

struct OutputLen;

impl hkdf::KeyType for OutputLen {
    fn len(&self) -> usize {
        KEY_BYTES
    }
}

/// A data class's key for one call.
pub struct ClassKey {
    bytes: [u8; KEY_BYTES],
    key: LessSafeKey,
}

impl ClassKey {
    fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self { key: aead_key(&bytes), bytes }
    }
}

/// Where a record sits: what binds its ciphertext to its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place<'a> {
    pub call: &'a str,
    pub kind: RecordKind,
    pub index: u64,
    /// The last chunk of a stream (audio): a stream cut short is then detectable.
    pub last: bool,
}

impl Place<'_> {
    fn nonce(&self) -> [u8; NONCE_LEN] {
        // kind (1 byte) || index (10 bytes, big-endian) || last flag (1 byte).
        let mut n = [0u8; NONCE_LEN];
        n[0] = self.kind as u8;
        n[3..11].copy_from_slice(&self.index.to_be_bytes());
        n[11] = u8::from(self.last);
        n
    }

    fn aad(&self) -> Vec<u8> {
        let mut aad = DOMAIN.to_vec();
        aad.extend_from_slice(b"/record");
        push_field(&mut aad, self.call.as_bytes());
        aad.push(self.kind as u8);
        aad.extend_from_slice(&self.index.to_be_bytes());
        aad.push(u8::from(self.last));
        aad
    }

    fn describe(&self) -> String {
        format!("record {:?} {} of call {}", self.kind, self.index, self.call)
    }
}

impl ClassKey {
    /// `ciphertext || tag`.
    pub fn seal(&self, place: Place<'_>, plaintext: &[u8]) -> Vec<u8> {
        let mut out = plaintext.to_vec();
        let nonce = Nonce::assume_unique_for_key(place.nonce());
        if self.key.seal_in_place_append_tag(nonce, Aad::from(place.aad()), &mut out).is_err() {
            // Only inputs over GCM's 64 GB limit fail; records are bounded far below.
            unreachable!("AES-GCM refused to seal a record");
        }
        out
    }

    pub fn open(&self, place: Place<'_>, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < TAG_BYTES {
            return Err(CryptoError::TooShort(place.describe()));
        }
        let mut buf = sealed.to_vec();
        let nonce = Nonce::assume_unique_for_key(place.nonce());
        let len = self
            .key
            .open_in_place(nonce, Aad::from(place.aad()), &mut buf)
            .map_err(|_| CryptoError::Authentication { what: place.describe() })?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(call: &str, kind: RecordKind, index: u64) -> Place<'_> {
        Place { call, kind, index, last: false }
    }

    #[test]
    fn a_record_opens_only_in_its_own_place_under_its_own_key() {
        let key = DataKey::from_bytes([7; KEY_BYTES]).class_key(DataClass::Transcript);
        let here = place("call-a", RecordKind::Utterance, 3);
        let sealed = key.seal(here, "我的电话是一三八".as_bytes());
        assert_eq!(key.open(here, &sealed).unwrap(), "我的电话是一三八".as_bytes());
        // Moved to another index, kind or call; marked last; another call's key; another class.
        for elsewhere in [
            place("call-a", RecordKind::Utterance, 4),
            place("call-a", RecordKind::Unmasked, 3),
            place("call-b", RecordKind::Utterance, 3),
            Place { last: true, ..here },
        ] {
            assert!(matches!(key.open(elsewhere, &sealed), Err(CryptoError::Authentication { .. })), "{elsewhere:?}");
        }
        let other_call = DataKey::from_bytes([8; KEY_BYTES]).class_key(DataClass::Transcript);
        assert!(other_call.open(here, &sealed).is_err());
        let other_class = DataKey::from_bytes([7; KEY_BYTES]).class_key(DataClass::Unmasked);
        assert!(other_class.open(here, &sealed).is_err());
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_fails() {
        let key = DataKey::from_bytes([1; KEY_BYTES]).class_key(DataClass::Audio);
        let here = Place { call: "c", kind: RecordKind::Audio, index: 0, last: true };
        let sealed = key.seal(here, b"0123456789");
        for bit in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(key.open(here, &bad).is_err(), "bit {bit}");
        }
        for len in 0..sealed.len() {
            assert!(key.open(here, &sealed[..len]).is_err(), "length {len}");
        }
    }

    #[test]
    fn the_same_plaintext_in_two_places_gives_unrelated_ciphertext() {
        let key = DataKey::from_bytes([2; KEY_BYTES]).class_key(DataClass::Transcript);
        let a = key.seal(place("c", RecordKind::Utterance, 0), b"same words");
        let b = key.seal(place("c", RecordKind::Utterance, 1), b"same words");
        assert_ne!(a, b);
        assert!(!a.windows(4).any(|w| w == b"same"));
    }

    #[test]
    fn a_wrapped_key_opens_only_for_its_call_and_class_under_its_master_key() {
        use DataClass::{Audio, Transcript};
        let master = MasterKey::new(&[9; KEY_BYTES]);
        let data = DataKey::from_bytes([5; KEY_BYTES]);
        let wrapped = master.wrap("call-1", Transcript, &data.class_key(Transcript), [3; NONCE_LEN]);
        let back = master.unwrap("call-1", Transcript, &wrapped).unwrap();
        let here = place("call-1", RecordKind::Utterance, 0);
        let sealed = data.class_key(Transcript).seal(here, b"x");
        assert_eq!(back.open(here, &sealed).unwrap(), b"x");
        assert!(master.unwrap("call-2", Transcript, &wrapped).is_err(), "a key moved to another call");
        assert!(master.unwrap("call-1", Audio, &wrapped).is_err(), "a key moved to another class");
        let other = MasterKey::new(&[10; KEY_BYTES]);
        assert_ne!(other.id(), master.id());
        assert!(matches!(other.unwrap("call-1", Transcript, &wrapped), Err(CryptoError::Authentication { .. })));
        assert!(matches!(master.unwrap("call-1", Transcript, &wrapped[1..]), Err(CryptoError::TooShort(_))));
        assert_eq!(format!("{data:?}"), "DataKey(…)");
    }
}
