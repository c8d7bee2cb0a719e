//! Device and admin identity for `weir-hub`: derived device keys, signed expiring device tokens
//! and admin bearer tokens.
//!
//! This module is the reference for how devices and admins prove who they are to the hub. The
//! scheme follows Azure IoT Hub's symmetric-key model (two keys per device, SAS-like tokens), with
//! one difference: the hub never stores device keys, it derives them.
//!
//! # Device ids
//!
//! A device id is 1 to 128 characters from `A-Z a-z 0-9 . _ : @ -` and does not start with `.`
//! (see [`check_device_id`]). The restriction means an id never needs percent-encoding in a token
//! or URL, can never contain the `\n` used as a separator below, and never looks like `.` or `..`
//! when used as a path component.
//!
//! # Device keys
//!
//! Every device has two key *slots*, `primary` and `secondary` ([`KeySlot`]). Each slot's key is
//! 32 bytes derived from the hub secret:
//!
//! ```text
//! key = HMAC-SHA256(hub_secret, "weir-device-key\n{device_id}\n{nonce}\n{slot}\n{generation}")
//! ```
//!
//! * `hub_secret` is 32 random bytes known only to the hub ([`HubSecret`]).
//! * `nonce` is a random string ([`new_nonce`]) chosen when the device is registered and stored
//!   with it. Deleting a device and registering it again under the same id picks a new nonce, so
//!   the old keys never come back to life.
//! * `slot` is the literal `primary` or `secondary`.
//! * `generation` is a per-slot counter (decimal, starting at 0) stored with the device.
//!
//! Keys are shown to people and devices as standard base64 with padding (44 characters), like
//! Azure IoT Hub keys ([`DeviceKey::to_base64`]).
//!
//! ## Why keys are never stored
//!
//! The device registry holds only the id, the nonce and the two generation counters. Nothing in
//! it (nor in its backups, dumps or logs) is enough to sign a token. The hub re-derives a key when
//! it needs one: to hand it out at provisioning time, and to check a token. The only secret to
//! protect is the hub secret, a single 0600 file or an injected base64 value, which is much easier
//! to guard than a database column. Replacing the hub secret changes every device key at once;
//! that is the emergency lever if the hub secret itself leaks.
//!
//! ## Rotation and revocation
//!
//! The hub accepts a token signed with either slot's current key, so a key can be replaced without
//! downtime:
//!
//! 1. Bump the generation of the slot the device is *not* using (say `secondary`) and give the
//!    new secondary key to the device.
//! 2. The device switches to signing with the secondary key. Tokens signed with the primary key
//!    keep working during the switch.
//! 3. Bump the generation of `primary`. The old primary key is now dead.
//!
//! To revoke a leaked key at once, bump its slot's generation; to lock a device out, bump both or
//! delete the device. Tokens already signed with a revoked key stop verifying immediately because
//! verification always uses the current generations: there is no list of issued tokens to clean up.
//!
//! # Device tokens
//!
//! A device authenticates each request with a token in the `Authorization` header:
//!
//! ```text
//! Authorization: SharedAccessSignature sr={resource}&se={expiry}&sig={signature}
//! ```
//!
//! * `sr`, the resource: `devices/{device_id}` ([`device_resource`]). Ids need no escaping.
//! * `se`, the expiry: unix seconds (decimal). The token is refused from that second on.
//! * `sig`, the signature: `base64url-no-pad(HMAC-SHA256(device_key, "{resource}\n{expiry}"))`,
//!   where `device_key` is the 32 raw key bytes (decode the base64 first) and `{expiry}` is the
//!   decimal number without leading zeros or sign.
//!
//! The fields may come in any order, each exactly once; unknown fields are refused. The
//! `SharedAccessSignature ` prefix is optional when parsing and matched without regard to case.
//!
//! The hub checks, in this order: the signature against both of the device's current keys
//! (constant-time), then that the token has not expired, then that the expiry is at most
//! [`MAX_TOKEN_LIFETIME`] (365 days) ahead, so that a leaked token cannot live forever. Both
//! checks allow [`TOKEN_CLOCK_SKEW`] (60 s) of difference between the device's clock and the
//! hub's. Sign with an expiry minutes to hours ahead and sign again before it passes. The
//! hub's `Date` header says what its clock reads: Weir's client signs by it, so a device
//! whose clock is not set (booted at 1970, before NTP) still gets in.
//!
//! Test vector (device key = the bytes 0, 1, ..., 31):
//!
//! ```text
//! key (base64)  AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=
//! resource      devices/cam-7
//! expiry        1764180000
//! token         SharedAccessSignature sr=devices/cam-7&se=1764180000&sig=Ygi2q6CnXBCkjxY0k1oybYUPi8gJ_Z-0URil70K1lgw
//! ```
//!
//! The same token from a shell, with `openssl` and GNU coreutils:
//!
//! ```sh
//! KEY=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8= ID=cam-7 SE=1764180000
//! HEXKEY=$(printf %s "$KEY" | base64 -d | xxd -p -c 64)
//! SIG=$(printf 'devices/%s\n%s' "$ID" "$SE" \
//!   | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$HEXKEY" -binary \
//!   | basenc --base64url | tr -d '=')
//! echo "SharedAccessSignature sr=devices/$ID&se=$SE&sig=$SIG"
//! ```
//!
//! # Admin token
//!
//! Admins send `Authorization: Bearer weir_admin_...`. The token is `weir_admin_` followed by
//! base64url of 32 random bytes ([`generate_admin_token`]); it is shown once and the hub keeps only
//! its SHA-256 as lowercase hex ([`admin_token_digest`]). A fast hash is enough because the token
//! carries 256 random bits: there is nothing to guess. [`admin_token_matches`] compares digests in
//! constant time.
//!
//! # Error messages
//!
//! [`TokenError`] messages are written for the person reading a 401 response. They never contain
//! key material or the signature, and echo other parts of the input only shortened and quoted.

use std::fmt::{self, Write as _};
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{
    GeneralPurpose, GeneralPurposeConfig, STANDARD, URL_SAFE_NO_PAD,
};
use ring::hmac;
use ring::rand::{SecureRandom as _, SystemRandom};
// The admin token's digest and its constant-time check are the local API's too.
pub use weir_query::access::{
    token_digest as admin_token_digest, token_matches as admin_token_matches,
};

/// The authorization scheme and separating space that start a device token header value.
pub const TOKEN_PREFIX: &str = "SharedAccessSignature ";

/// The longest time, in seconds (365 days), a device token may still be valid when verified.
pub const MAX_TOKEN_LIFETIME: u64 = 365 * 24 * 3600;

/// How far a device's clock may be from the hub's, in seconds, for its tokens' expiry.
pub const TOKEN_CLOCK_SKEW: u64 = 60;

/// The most characters a device id may have.
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// The fixed start of every admin token, so leaked tokens are easy to spot and scan for.
pub const ADMIN_TOKEN_PREFIX: &str = "weir_admin_";

/// [`TOKEN_PREFIX`] without its space, for case-insensitive matching of the scheme.
const TOKEN_SCHEME: &str = "SharedAccessSignature";

/// Resource prefix of device tokens.
const DEVICE_RESOURCE_PREFIX: &str = "devices/";

/// Domain-separation label of the key derivation, so these HMACs can never collide with another
/// use of the hub secret.
const KEY_DERIVATION_LABEL: &str = "weir-device-key";

/// Length in bytes of the hub secret, of device keys and of token signatures (HMAC-SHA256).
const KEY_LEN: usize = 32;

/// A hub secret file is a few dozen bytes; reading no more keeps a wrong path from eating memory.
const MAX_SECRET_FILE_LEN: u64 = 4096;

/// Accepts base64 pasted from anywhere: standard padded keys (Azure style) or unpadded ones.
const LENIENT_STANDARD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Same as [`LENIENT_STANDARD`] for the URL-safe alphabet.
const LENIENT_URL_SAFE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Errors about identities, secrets and keys (not about tokens: see [`TokenError`]).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A device id breaks the rules of [`check_device_id`].
    #[error("invalid device id {}: {problem}", snippet(.id, 64))]
    BadDeviceId {
        /// The refused id, in full.
        id: String,
        /// What is wrong with it.
        problem: DeviceIdProblem,
    },
    /// Reading or writing the hub secret file failed.
    #[error("hub secret file {}: {source}", .path.display())]
    Io {
        /// The file the operation was about.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The hub secret file can be accessed by group or others.
    #[error(
        "hub secret file {} has mode {:03o}, so users other than its owner can access it; \
         restrict it with `chmod 600 {}`",
        .path.display(),
        .mode,
        .path.display()
    )]
    InsecureSecretFile {
        /// The refused file.
        path: PathBuf,
        /// Its permission bits (`0o777` mask).
        mode: u32,
    },
    /// A hub secret is not base64 of exactly 32 bytes.
    #[error("invalid hub secret: {0}")]
    BadSecret(String),
    /// A device key is not base64 of exactly 32 bytes.
    #[error("invalid device key: {0}")]
    BadKey(String),
    /// A key slot name is neither `primary` nor `secondary`.
    #[error("unknown key slot {}; expected `primary` or `secondary`", snippet(.0, 32))]
    BadKeySlot(String),
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Why a device id was refused by [`check_device_id`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceIdProblem {
    /// The id is empty.
    Empty,
    /// The id starts with `.` (position 1).
    LeadingDot,
    /// The id contains a character outside `[A-Za-z0-9._:@-]`.
    BadChar {
        /// The first offending character.
        ch: char,
        /// Its position in characters, counting from 1.
        position: usize,
    },
    /// The id is longer than [`MAX_DEVICE_ID_LEN`].
    TooLong {
        /// Its length in characters.
        len: usize,
    },
}

impl fmt::Display for DeviceIdProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "it is empty; use 1 to {MAX_DEVICE_ID_LEN} characters"),
            Self::LeadingDot => {
                f.write_str("the '.' at position 1 is not allowed; ids may not start with a dot")
            }
            Self::BadChar { ch, position } => write!(
                f,
                "the character {ch:?} at position {position} is not allowed; \
                 use letters, digits and . _ : @ -"
            ),
            Self::TooLong { len } => {
                write!(
                    f,
                    "it is {len} characters long; the maximum is {MAX_DEVICE_ID_LEN}"
                )
            }
        }
    }
}

/// Why a device token was refused. The messages are meant for the client, in a 401 body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The header value is not a well-formed token; the message names the problem.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature is valid but the expiry has passed.
    #[error("the token expired at {expiry} (now {now})")]
    Expired {
        /// The token's expiry, unix seconds.
        expiry: u64,
        /// The hub's clock, unix seconds.
        now: u64,
    },
    /// The signature is valid but the expiry is more than [`MAX_TOKEN_LIFETIME`] ahead.
    #[error(
        "the token expires at {expiry}, more than 365 days after now ({now}); \
         sign a token with a shorter lifetime"
    )]
    TooLong {
        /// The token's expiry, unix seconds.
        expiry: u64,
        /// The hub's clock, unix seconds.
        now: u64,
    },
    /// The signature does not match any of the keys the token was checked against.
    #[error("the token signature does not match the device's keys")]
    BadSignature,
}

/// Checks that `id` is a valid device id: 1 to 128 characters from `[A-Za-z0-9._:@-]`, not
/// starting with `.`. The error names the id and the first offending character and its position.
pub fn check_device_id(id: &str) -> Result<(), IdentityError> {
    match device_id_problem(id) {
        None => Ok(()),
        Some(problem) => Err(IdentityError::BadDeviceId {
            id: id.to_owned(),
            problem,
        }),
    }
}

fn device_id_problem(id: &str) -> Option<DeviceIdProblem> {
    if id.is_empty() {
        return Some(DeviceIdProblem::Empty);
    }
    if id.starts_with('.') {
        return Some(DeviceIdProblem::LeadingDot);
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-');
    if let Some((index, ch)) = id.chars().enumerate().find(|&(_, c)| !allowed(c)) {
        return Some(DeviceIdProblem::BadChar {
            ch,
            position: index + 1,
        });
    }
    // Every character is ASCII by now, so bytes and characters count the same.
    (id.len() > MAX_DEVICE_ID_LEN).then_some(DeviceIdProblem::TooLong { len: id.len() })
}

/// One of a device's two key slots. Two slots let a key be replaced while the other keeps
/// working (see the module docs on rotation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySlot {
    /// The `primary` slot.
    Primary,
    /// The `secondary` slot.
    Secondary,
}

impl KeySlot {
    /// Both slots, primary first.
    pub const ALL: [KeySlot; 2] = [KeySlot::Primary, KeySlot::Secondary];

    /// The slot's name as used in key derivation and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            KeySlot::Primary => "primary",
            KeySlot::Secondary => "secondary",
        }
    }
}

impl fmt::Display for KeySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeySlot {
    type Err = IdentityError;

    /// Parses `primary` or `secondary`, ignoring ASCII case.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        KeySlot::ALL
            .into_iter()
            .find(|slot| slot.as_str().eq_ignore_ascii_case(text))
            .ok_or_else(|| IdentityError::BadKeySlot(text.to_owned()))
    }
}

/// The hub's 32-byte master secret from which every device key is derived.
///
/// Its `Debug` output is `HubSecret(..)` so it cannot leak through logs.
pub struct HubSecret([u8; KEY_LEN]);

impl fmt::Debug for HubSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HubSecret(..)")
    }
}

impl HubSecret {
    /// Generates a new random secret.
    pub fn generate() -> Result<HubSecret, IdentityError> {
        random_bytes().map(HubSecret)
    }

    /// Reads a secret given as base64 (standard or URL-safe alphabet, padding optional) of
    /// exactly 32 bytes. Surrounding whitespace is ignored.
    pub fn from_base64(text: &str) -> Result<HubSecret, IdentityError> {
        decode_key(text)
            .map(HubSecret)
            .map_err(IdentityError::BadSecret)
    }

    /// The secret as standard padded base64, the format of the secret file.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Loads the secret from `path`, or creates the file with a new random secret if it does not
    /// exist. Returns the secret and whether the file was created.
    ///
    /// The file holds the base64 secret and a newline. A new file is written to a temporary file
    /// with mode 0600 in the same directory and renamed into place, so no reader ever sees a
    /// partial secret. An existing file that group or others can access is refused
    /// ([`IdentityError::InsecureSecretFile`]) rather than silently trusted; the parent directory
    /// must already exist.
    pub fn load_or_create(path: &Path) -> Result<(HubSecret, bool), IdentityError> {
        match fs::File::open(path) {
            Ok(file) => load_secret_file(path, file).map(|secret| (secret, false)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                create_secret_file(path).map(|secret| (secret, true))
            }
            Err(source) => Err(io_error(path, source)),
        }
    }

    /// Derives the key of `device_id`'s `slot` at `generation` (see the module docs).
    ///
    /// `device_id` must have passed [`check_device_id`] and `nonce` must come from
    /// [`new_nonce`]: neither may contain a newline, or two different inputs could derive the
    /// same key.
    pub fn device_key(
        &self,
        device_id: &str,
        nonce: &str,
        slot: KeySlot,
        generation: u64,
    ) -> DeviceKey {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let input = format!("{KEY_DERIVATION_LABEL}\n{device_id}\n{nonce}\n{slot}\n{generation}");
        DeviceKey(tag_bytes(&hmac::sign(&key, input.as_bytes())))
    }
}

fn load_secret_file(path: &Path, file: fs::File) -> Result<HubSecret, IdentityError> {
    // Check the mode of the opened file rather than the path, so the file checked is the one read.
    let metadata = file.metadata().map_err(|source| io_error(path, source))?;
    check_secret_file_mode(path, &metadata)?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_LEN)
        .read_to_end(&mut bytes)
        .map_err(|source| io_error(path, source))?;
    std::str::from_utf8(&bytes)
        .map_err(|_| "expected base64 text, but the file is not UTF-8".to_owned())
        .and_then(decode_key)
        .map(HubSecret)
        .map_err(|problem| IdentityError::BadSecret(format!("{}: {problem}", path.display())))
}

#[cfg(unix)]
fn check_secret_file_mode(path: &Path, metadata: &fs::Metadata) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::InsecureSecretFile {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_secret_file_mode(_path: &Path, _metadata: &fs::Metadata) -> Result<(), IdentityError> {
    // No Unix permission bits to check; the file's ACLs are the operator's business.
    Ok(())
}

fn create_secret_file(path: &Path) -> Result<HubSecret, IdentityError> {
    let Some(file_name) = path.file_name() else {
        let source = io::Error::new(io::ErrorKind::InvalidInput, "not a file path");
        return Err(io_error(path, source));
    };
    let secret = HubSecret::generate()?;
    // A random temporary name, opened with create_new, never clobbers or follows anything an
    // attacker may have placed in the directory.
    let suffix = hex(&random_bytes::<8>()?);
    let temp = path.with_file_name(format!(".{}.tmp-{suffix}", file_name.to_string_lossy()));
    let contents = format!("{}\n", secret.to_base64());
    let written = write_private_file(&temp, contents.as_bytes())
        .and_then(|()| fs::rename(&temp, path).map_err(|source| io_error(path, source)));
    if let Err(error) = written {
        // Best effort: do not leave a stray copy of a secret that will never be used.
        let _ = fs::remove_file(&temp);
        return Err(error);
    }
    sync_parent_dir(path);
    Ok(secret)
}

fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), IdentityError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Set at creation, so the secret is never readable by others, not even briefly.
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|source| io_error(path, source))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| io_error(path, source))
}

/// Makes the rename durable across a crash. Best effort: failing here does not make the secret
/// in memory or on disk wrong, at worst a crash right now loses the new file.
fn sync_parent_dir(path: &Path) {
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        let dir = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Ok(dir) = fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn io_error(path: &Path, source: io::Error) -> IdentityError {
    IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A device's 32-byte symmetric key for one slot. Devices sign tokens with it ([`sign_token`]).
///
/// Its `Debug` output is `DeviceKey(..)` so it cannot leak through logs.
#[derive(Clone)]
pub struct DeviceKey([u8; KEY_LEN]);

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

impl DeviceKey {
    /// The key as standard padded base64 (44 characters), the form handed to devices.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Reads a key given as base64 (standard or URL-safe alphabet, padding optional) of exactly
    /// 32 bytes. Surrounding whitespace is ignored.
    pub fn from_base64(text: &str) -> Result<DeviceKey, IdentityError> {
        decode_key(text)
            .map(DeviceKey)
            .map_err(IdentityError::BadKey)
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }
}

/// Returns a new random device nonce: 16 random bytes as base64url without padding.
pub fn new_nonce() -> Result<String, IdentityError> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<16>()?))
}

/// The token resource of a device: `devices/{device_id}`.
pub fn device_resource(device_id: &str) -> String {
    format!("{DEVICE_RESOURCE_PREFIX}{device_id}")
}

/// Signs a token for `resource` valid until `expiry_unix` and returns the full header value,
/// `SharedAccessSignature sr=...&se=...&sig=...`.
pub fn sign_token(resource: &str, key: &DeviceKey, expiry_unix: u64) -> String {
    let tag = hmac::sign(
        &key.hmac_key(),
        signing_input(resource, expiry_unix).as_bytes(),
    );
    let signature = URL_SAFE_NO_PAD.encode(tag.as_ref());
    format!("{TOKEN_PREFIX}sr={resource}&se={expiry_unix}&sig={signature}")
}

/// The exact bytes a token signature covers. The resource never contains a newline and the
/// expiry is only digits, so this string cannot be read two ways.
fn signing_input(resource: &str, expiry: u64) -> String {
    format!("{resource}\n{expiry}")
}

/// A parsed device token. Parsing checks only its shape; call [`DeviceToken::verify`] with the
/// device's keys before trusting anything in it.
///
/// Its `Debug` output hides the signature, since a token is itself a credential until it expires.
#[derive(Clone)]
pub struct DeviceToken {
    /// The signed resource, e.g. `devices/cam-7`.
    pub resource: String,
    /// The expiry, unix seconds.
    pub expiry: u64,
    signature: Vec<u8>,
}

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceToken")
            .field("resource", &self.resource)
            .field("expiry", &self.expiry)
            .field("signature", &format_args!(".."))
            .finish()
    }
}

impl DeviceToken {
    /// Parses a token header value, with or without the `SharedAccessSignature ` prefix.
    ///
    /// The fields `sr`, `se` and `sig` may come in any order, each exactly once; anything else
    /// is [`TokenError::Malformed`] with a message naming the problem.
    pub fn parse(header_value: &str) -> Result<DeviceToken, TokenError> {
        let text = header_value.trim();
        let body = match text.split_once(char::is_whitespace) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(TOKEN_SCHEME) => rest.trim_start(),
            // A first word without `=` is a scheme, just not ours (say `Bearer`); with `=` it is
            // a body with stray whitespace, reported below.
            Some((scheme, _)) if !scheme.contains('=') => {
                return Err(malformed(format!(
                    "expected the `{TOKEN_SCHEME}` scheme, got {}",
                    snippet(scheme, 32)
                )));
            }
            Some(_) => text,
            None if text.eq_ignore_ascii_case(TOKEN_SCHEME) => "",
            None => text,
        };
        if body.is_empty() {
            return Err(malformed("the token is empty".to_owned()));
        }
        if body.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(malformed(
                "the token contains spaces or control characters".to_owned(),
            ));
        }

        let (mut sr, mut se, mut sig) = (None, None, None);
        for field in body.split('&') {
            if field.is_empty() {
                return Err(malformed("empty field (stray `&`)".to_owned()));
            }
            let Some((name, value)) = field.split_once('=') else {
                return Err(malformed(format!(
                    "field {} has no `=`",
                    snippet(field, 32)
                )));
            };
            let seen = match name {
                "sr" => &mut sr,
                "se" => &mut se,
                "sig" => &mut sig,
                _ => {
                    return Err(malformed(format!(
                        "unknown field {}; expected `sr`, `se` and `sig`",
                        snippet(name, 32)
                    )));
                }
            };
            if seen.replace(value).is_some() {
                return Err(malformed(format!("duplicate field `{name}`")));
            }
        }

        let resource = sr.ok_or_else(|| malformed("missing field `sr` (resource)".to_owned()))?;
        let expiry = se.ok_or_else(|| malformed("missing field `se` (expiry)".to_owned()))?;
        let sig = sig.ok_or_else(|| malformed("missing field `sig` (signature)".to_owned()))?;

        if resource.is_empty() {
            return Err(malformed("field `sr` (resource) is empty".to_owned()));
        }
        // `u64::from_str` would also take a leading `+`; insist on plain digits.
        if expiry.is_empty() || !expiry.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed(format!(
                "field `se` (expiry) must be unix seconds, got {}",
                snippet(expiry, 32)
            )));
        }
        let expiry = expiry
            .parse::<u64>()
            .map_err(|_| malformed("field `se` (expiry) is out of range".to_owned()))?;
        // Never echo the signature: it is part of a credential.
        let signature = URL_SAFE_NO_PAD.decode(sig).map_err(|_| {
            malformed("field `sig` (signature) is not valid unpadded base64url".to_owned())
        })?;
        if signature.len() != KEY_LEN {
            return Err(malformed(format!(
                "field `sig` (signature) must decode to {KEY_LEN} bytes, got {}",
                signature.len()
            )));
        }
        Ok(DeviceToken {
            resource: resource.to_owned(),
            expiry,
            signature,
        })
    }

    /// The device id when the resource is `devices/{id}` with a valid id, else `None`.
    ///
    /// The id is not authenticated yet: use it to look up the device's keys, then
    /// [`verify`](DeviceToken::verify).
    pub fn device_id(&self) -> Option<&str> {
        let id = self.resource.strip_prefix(DEVICE_RESOURCE_PREFIX)?;
        device_id_problem(id).is_none().then_some(id)
    }

    /// Verifies the token against candidate keys (normally the device's primary and secondary)
    /// at time `now_unix`.
    ///
    /// The signature is checked first, in constant time, so a forged token only ever learns
    /// [`TokenError::BadSignature`]. A genuine token is then refused if it has expired
    /// (`expiry + TOKEN_CLOCK_SKEW <= now`) or if its expiry is more than
    /// [`MAX_TOKEN_LIFETIME`] (plus the skew) ahead. An empty key list refuses every token.
    pub fn verify(&self, keys: &[&DeviceKey], now_unix: u64) -> Result<(), TokenError> {
        let input = signing_input(&self.resource, self.expiry);
        let signed_by_a_key = keys
            .iter()
            .any(|key| hmac::verify(&key.hmac_key(), input.as_bytes(), &self.signature).is_ok());
        if !signed_by_a_key {
            return Err(TokenError::BadSignature);
        }
        let (expiry, now) = (self.expiry, now_unix);
        if expiry.saturating_add(TOKEN_CLOCK_SKEW) <= now {
            return Err(TokenError::Expired { expiry, now });
        }
        if expiry.saturating_sub(now) > MAX_TOKEN_LIFETIME + TOKEN_CLOCK_SKEW {
            return Err(TokenError::TooLong { expiry, now });
        }
        Ok(())
    }
}

fn malformed(message: String) -> TokenError {
    TokenError::Malformed(message)
}

/// Generates a new admin token: `weir_admin_` followed by base64url of 32 random bytes.
/// Show it once and store only [`admin_token_digest`] of it.
pub fn generate_admin_token() -> Result<String, IdentityError> {
    let random = random_bytes::<32>()?;
    Ok(format!(
        "{ADMIN_TOKEN_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(random)
    ))
}

/// A random id for one run of a hub, telling it from others sharing its database.
pub fn instance_id() -> Result<String, IdentityError> {
    Ok(hex(&random_bytes::<8>()?))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], IdentityError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Random)?;
    Ok(bytes)
}

/// Decodes base64 of exactly [`KEY_LEN`] bytes. The error never echoes the input.
fn decode_key(text: &str) -> Result<[u8; KEY_LEN], String> {
    let text = text.trim();
    let bytes = LENIENT_STANDARD
        .decode(text)
        .or_else(|_| LENIENT_URL_SAFE.decode(text))
        .map_err(|_| format!("expected base64 of {KEY_LEN} bytes, but it is not valid base64"))?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
        format!(
            "expected base64 of {KEY_LEN} bytes, got {} bytes",
            bytes.len()
        )
    })
}

fn tag_bytes(tag: &hmac::Tag) -> [u8; KEY_LEN] {
    // Copy without a length assertion: HMAC-SHA256 tags are always KEY_LEN bytes.
    let mut bytes = [0u8; KEY_LEN];
    for (out, byte) in bytes.iter_mut().zip(tag.as_ref()) {
        *out = *byte;
    }
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            // Writing to a String cannot fail.
            let _ = write!(out, "{byte:02x}");
            out
        })
}

/// Quotes untrusted text for an error message, cut to `max` characters so a huge header cannot
/// blow up a response body.
fn snippet(text: &str, max: usize) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(max).collect();
    if chars.next().is_some() {
        format!("{head:?}…")
    } else {
        format!("{head:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_180_000;

    fn secret() -> HubSecret {
        HubSecret(std::array::from_fn(|i| u8::try_from(i).unwrap_or(0)))
    }

    fn keys() -> (DeviceKey, DeviceKey) {
        let secret = secret();
        (
            secret.device_key("cam-7", "nonce-1", KeySlot::Primary, 0),
            secret.device_key("cam-7", "nonce-1", KeySlot::Secondary, 0),
        )
    }

    fn token_for(key: &DeviceKey, expiry: u64) -> DeviceToken {
        DeviceToken::parse(&sign_token(&device_resource("cam-7"), key, expiry)).expect("parses")
    }

    fn malformed_message(header: &str) -> String {
        match DeviceToken::parse(header) {
            Err(TokenError::Malformed(message)) => message,
            other => panic!("expected Malformed for {header:?}, got {other:?}"),
        }
    }

    /// Replaces the value of `field` in a signed header value.
    fn with_field(header: &str, field: &str, value: &str) -> String {
        let body = header.strip_prefix(TOKEN_PREFIX).expect("prefix");
        let fields: Vec<String> = body
            .split('&')
            .map(|f| match f.split_once('=') {
                Some((name, _)) if name == field => format!("{name}={value}"),
                _ => f.to_owned(),
            })
            .collect();
        format!("{TOKEN_PREFIX}{}", fields.join("&"))
    }

    #[test]
    fn a_signed_token_verifies_with_the_primary_key() {
        let (primary, secondary) = keys();
        let token = token_for(&primary, NOW + 3600);
        assert_eq!(token.resource, "devices/cam-7");
        assert_eq!(token.expiry, NOW + 3600);
        assert_eq!(token.device_id(), Some("cam-7"));
        assert_eq!(token.verify(&[&primary, &secondary], NOW), Ok(()));
    }

    #[test]
    fn a_token_signed_with_the_secondary_key_is_accepted() {
        let (primary, secondary) = keys();
        let token = token_for(&secondary, NOW + 60);
        assert_eq!(token.verify(&[&primary, &secondary], NOW), Ok(()));
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() {
        let (primary, secondary) = keys();
        let other = secret().device_key("cam-8", "nonce-1", KeySlot::Primary, 0);
        let token = token_for(&other, NOW + 60);
        assert_eq!(
            token.verify(&[&primary, &secondary], NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(token.verify(&[], NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn an_expired_token_is_refused_naming_both_times() {
        let (primary, _) = keys();
        let token = token_for(&primary, NOW);
        let error = token.verify(&[&primary], NOW + 300).expect_err("expired");
        assert_eq!(
            error,
            TokenError::Expired {
                expiry: NOW,
                now: NOW + 300
            }
        );
        assert_eq!(
            error.to_string(),
            "the token expired at 1764180000 (now 1764180300)"
        );
        // Within the allowed skew of the hub's clock it still passes; at the skew's end
        // it is too late.
        assert_eq!(
            token.verify(&[&primary], NOW + TOKEN_CLOCK_SKEW - 1),
            Ok(())
        );
        assert!(matches!(
            token.verify(&[&primary], NOW + TOKEN_CLOCK_SKEW),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn a_tampered_signature_is_refused_as_bad_signature() {
        let (primary, _) = keys();
        let header = sign_token("devices/cam-7", &primary, NOW + 60);
        let forged = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let token = DeviceToken::parse(&with_field(&header, "sig", &forged)).expect("parses");
        assert_eq!(
            token.verify(&[&primary], NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn a_tampered_resource_is_refused_as_bad_signature() {
        let (primary, _) = keys();
        let header = sign_token("devices/cam-7", &primary, NOW + 60);
        let token =
            DeviceToken::parse(&with_field(&header, "sr", "devices/cam-8")).expect("parses");
        assert_eq!(
            token.verify(&[&primary], NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn a_tampered_expiry_is_refused_as_bad_signature() {
        let (primary, _) = keys();
        let header = sign_token("devices/cam-7", &primary, NOW + 60);
        let later = (NOW + 7200).to_string();
        let token = DeviceToken::parse(&with_field(&header, "se", &later)).expect("parses");
        assert_eq!(
            token.verify(&[&primary], NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn fields_are_accepted_in_any_order_and_without_the_prefix() {
        let (primary, _) = keys();
        let header = sign_token("devices/cam-7", &primary, NOW + 60);
        let body = header.strip_prefix(TOKEN_PREFIX).expect("prefix");
        let mut fields: Vec<&str> = body.split('&').collect();
        fields.reverse();
        let reordered = fields.join("&");
        for text in [
            body.to_owned(),
            reordered.clone(),
            format!("sharedaccesssignature  {reordered} "),
        ] {
            let token = DeviceToken::parse(&text).expect("parses");
            assert_eq!(token.verify(&[&primary], NOW), Ok(()), "{text}");
        }
    }

    #[test]
    fn malformed_tokens_are_refused_with_a_message_naming_the_problem() {
        let sig = URL_SAFE_NO_PAD.encode([1u8; 32]);
        let cases = [
            (format!("sr=devices/a&sig={sig}"), "missing field `se`"),
            (format!("se=5&sig={sig}"), "missing field `sr`"),
            ("sr=devices/a&se=5".to_owned(), "missing field `sig`"),
            (
                format!("sr=devices/a&sr=devices/b&se=5&sig={sig}"),
                "duplicate field `sr`",
            ),
            (
                format!("sr=devices/a&se=5&sig={sig}&skn=owner"),
                "unknown field \"skn\"",
            ),
            (
                "sr=devices/a&se=5&sig=not*base64".to_owned(),
                "not valid unpadded base64url",
            ),
            (
                format!("sr=devices/a&se=5&sig={sig}="),
                "not valid unpadded base64url",
            ),
            (
                "sr=devices/a&se=5&sig=AAAA".to_owned(),
                "must decode to 32 bytes, got 3",
            ),
            (
                format!("sr=devices/a&se=soon&sig={sig}"),
                "`se` (expiry) must be unix seconds",
            ),
            (
                format!("sr=devices/a&se=+5&sig={sig}"),
                "`se` (expiry) must be unix seconds",
            ),
            (
                format!("sr=devices/a&se=99999999999999999999&sig={sig}"),
                "out of range",
            ),
            (format!("sr=&se=5&sig={sig}"), "`sr` (resource) is empty"),
            (format!("sr=devices/a&&se=5&sig={sig}"), "stray `&`"),
            (
                format!("sr=devices/a&se&sig={sig}"),
                "field \"se\" has no `=`",
            ),
            (
                format!("Bearer sr=devices/a&se=5&sig={sig}"),
                "scheme, got \"Bearer\"",
            ),
            (
                format!("sr=devices/a\tb&se=5&sig={sig}"),
                "spaces or control characters",
            ),
            (String::new(), "the token is empty"),
            ("   ".to_owned(), "the token is empty"),
            ("SharedAccessSignature ".to_owned(), "the token is empty"),
        ];
        for (header, expected) in cases {
            let message = malformed_message(&header);
            assert!(
                message.contains(expected),
                "{header:?}: {message:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn error_messages_never_echo_the_signature_or_huge_input() {
        let message = malformed_message("sr=devices/a&se=5&sig=c2VjcmV0LXNpZ25hdHVyZQ*");
        assert!(!message.contains("c2VjcmV0"), "{message}");
        let long_name = "x".repeat(10_000);
        let message = malformed_message(&format!("{long_name}=1"));
        assert!(message.len() < 200, "{message}");
    }

    #[test]
    fn parsing_odd_input_never_panics() {
        for header in [
            "=",
            "&",
            "&&=",
            "sr==",
            "sig=é",
            "sr=é&se=1&sig=",
            "\u{0}",
            "ñ ñ",
            "se=٣",
        ] {
            assert!(DeviceToken::parse(header).is_err(), "{header:?}");
        }
    }

    #[test]
    fn a_token_living_longer_than_a_year_is_refused() {
        let (primary, _) = keys();
        // The limit, plus the clock skew a device's clock may have.
        let limit = NOW + MAX_TOKEN_LIFETIME + TOKEN_CLOCK_SKEW;
        let at_limit = token_for(&primary, limit);
        assert_eq!(at_limit.verify(&[&primary], NOW), Ok(()));
        let too_long = token_for(&primary, limit + 1);
        let error = too_long.verify(&[&primary], NOW).expect_err("too long");
        assert_eq!(
            error,
            TokenError::TooLong {
                expiry: limit + 1,
                now: NOW
            }
        );
        assert!(error.to_string().contains("365 days"), "{error}");
        let forever = token_for(&primary, u64::MAX);
        assert!(matches!(
            forever.verify(&[&primary], NOW),
            Err(TokenError::TooLong { .. })
        ));
    }

    #[test]
    fn device_id_is_none_for_other_resources() {
        let (primary, _) = keys();
        for resource in [
            "devices/",
            "devices/.hidden",
            "devices/a/b",
            "modules/cam-7",
            "x",
        ] {
            let token =
                DeviceToken::parse(&sign_token(resource, &primary, NOW + 1)).expect("parses");
            assert_eq!(token.device_id(), None, "{resource}");
        }
    }

    #[test]
    fn derived_keys_differ_by_device_nonce_slot_and_generation() {
        let secret = secret();
        let base = secret
            .device_key("cam-7", "n1", KeySlot::Primary, 0)
            .to_base64();
        let variants = [
            secret.device_key("cam-8", "n1", KeySlot::Primary, 0),
            secret.device_key("cam-7", "n2", KeySlot::Primary, 0),
            secret.device_key("cam-7", "n1", KeySlot::Secondary, 0),
            secret.device_key("cam-7", "n1", KeySlot::Primary, 1),
            HubSecret([9; 32]).device_key("cam-7", "n1", KeySlot::Primary, 0),
        ];
        let mut all: Vec<String> = variants.iter().map(DeviceKey::to_base64).collect();
        all.push(base);
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count, "two derivations collided");
    }

    #[test]
    fn derived_keys_are_stable_for_the_same_inputs() {
        let a = secret().device_key("cam-7", "n1", KeySlot::Secondary, 3);
        let b = HubSecret::from_base64(&secret().to_base64())
            .expect("round trip")
            .device_key("cam-7", "n1", KeySlot::Secondary, 3);
        assert_eq!(a.to_base64(), b.to_base64());
    }

    #[test]
    fn the_derivation_input_is_the_documented_string() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &secret().0);
        let expected = hmac::sign(&key, b"weir-device-key\ncam-7\nnonce-1\nsecondary\n42");
        let derived = secret().device_key("cam-7", "nonce-1", KeySlot::Secondary, 42);
        assert_eq!(derived.to_base64(), STANDARD.encode(expected.as_ref()));
    }

    #[test]
    fn the_documented_token_test_vector_holds() {
        let key =
            DeviceKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").expect("key");
        assert_eq!(
            sign_token("devices/cam-7", &key, 1_764_180_000),
            "SharedAccessSignature sr=devices/cam-7&se=1764180000\
             &sig=Ygi2q6CnXBCkjxY0k1oybYUPi8gJ_Z-0URil70K1lgw"
        );
    }

    #[test]
    fn device_keys_round_trip_through_base64() {
        let (primary, _) = keys();
        let text = primary.to_base64();
        assert_eq!(text.len(), 44);
        let back = DeviceKey::from_base64(&format!("  {text}\n")).expect("decodes");
        assert_eq!(back.to_base64(), text);
        let unpadded_url = URL_SAFE_NO_PAD.encode(primary.0);
        assert_eq!(
            DeviceKey::from_base64(&unpadded_url)
                .expect("url-safe")
                .to_base64(),
            text
        );
        let error = DeviceKey::from_base64("AAAA").expect_err("short");
        assert!(error.to_string().contains("got 3 bytes"), "{error}");
    }

    #[test]
    fn a_hub_secret_must_be_base64_of_32_bytes() {
        let short = HubSecret::from_base64("AAAA").expect_err("short");
        assert!(short.to_string().contains("got 3 bytes"), "{short}");
        let garbage = HubSecret::from_base64("this is not base64!").expect_err("garbage");
        assert!(
            garbage.to_string().contains("not valid base64"),
            "{garbage}"
        );
        let text = HubSecret::generate().expect("random").to_base64();
        assert!(HubSecret::from_base64(&format!("\n{text}\n")).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn the_secret_file_is_created_0600_and_reloads_identically() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.secret");
        let (created, was_created) = HubSecret::load_or_create(&path).expect("create");
        assert!(was_created);
        let mode = fs::metadata(&path).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let contents = fs::read_to_string(&path).expect("read");
        assert_eq!(contents, format!("{}\n", created.to_base64()));
        let (loaded, was_created) = HubSecret::load_or_create(&path).expect("load");
        assert!(!was_created);
        assert_eq!(loaded.to_base64(), created.to_base64());
        // Only the secret file is left behind, no temporary file.
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_readable_by_others_is_refused_with_a_chmod_hint() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.secret");
        HubSecret::load_or_create(&path).expect("create");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let error = HubSecret::load_or_create(&path).expect_err("insecure");
        assert!(
            matches!(
                &error,
                IdentityError::InsecureSecretFile { mode: 0o644, .. }
            ),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("mode 644"), "{message}");
        assert!(
            message.contains(&format!("chmod 600 {}", path.display())),
            "{message}"
        );
    }

    #[test]
    fn a_corrupt_secret_file_is_refused_without_echoing_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.secret");
        write_private_file(&path, b"AAAA-not-a-secret\n").expect("write");
        let error = HubSecret::load_or_create(&path).expect_err("corrupt");
        assert!(matches!(error, IdentityError::BadSecret(_)), "{error:?}");
        assert!(!error.to_string().contains("AAAA"), "{error}");
    }

    #[test]
    fn a_missing_directory_is_an_io_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing").join("hub.secret");
        let error = HubSecret::load_or_create(&path).expect_err("no dir");
        assert!(matches!(error, IdentityError::Io { .. }), "{error:?}");
        assert!(error.to_string().contains("missing"), "{error}");
    }

    #[test]
    fn debug_output_shows_no_key_material() {
        let secret = secret();
        let (primary, _) = keys();
        let token = token_for(&primary, NOW + 60);
        assert_eq!(format!("{secret:?}"), "HubSecret(..)");
        assert_eq!(format!("{primary:?}"), "DeviceKey(..)");
        let token_debug = format!("{token:?}");
        let header = sign_token("devices/cam-7", &primary, NOW + 60);
        let sig = header.rsplit_once("sig=").map(|(_, sig)| sig).expect("sig");
        assert!(!token_debug.contains(sig), "{token_debug}");
        for debug in [format!("{secret:?}"), format!("{primary:?}"), token_debug] {
            assert!(!debug.contains(&secret.to_base64()), "{debug}");
            assert!(!debug.contains(&primary.to_base64()), "{debug}");
            assert!(!debug.contains(&format!("{:?}", primary.0)), "{debug}");
        }
    }

    #[test]
    fn check_device_id_accepts_the_allowed_alphabet() {
        for id in [
            "a",
            "cam-7",
            "site.a:cam_7@edge",
            "A.",
            &"x".repeat(MAX_DEVICE_ID_LEN),
        ] {
            assert!(check_device_id(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn check_device_id_refuses_with_the_first_bad_character_and_its_position() {
        let problem = |id: &str| match check_device_id(id) {
            Err(IdentityError::BadDeviceId { problem, .. }) => problem,
            other => panic!("expected BadDeviceId for {id:?}, got {other:?}"),
        };
        assert_eq!(problem(""), DeviceIdProblem::Empty);
        assert_eq!(problem(".cam"), DeviceIdProblem::LeadingDot);
        assert_eq!(
            problem("cam/7 x"),
            DeviceIdProblem::BadChar {
                ch: '/',
                position: 4
            }
        );
        assert_eq!(
            problem("ñandú"),
            DeviceIdProblem::BadChar {
                ch: 'ñ',
                position: 1
            }
        );
        assert_eq!(
            problem("ab\n"),
            DeviceIdProblem::BadChar {
                ch: '\n',
                position: 3
            }
        );
        let long = "x".repeat(MAX_DEVICE_ID_LEN + 1);
        assert_eq!(
            problem(&long),
            DeviceIdProblem::TooLong {
                len: MAX_DEVICE_ID_LEN + 1
            }
        );

        let message = check_device_id("cam/7").expect_err("bad").to_string();
        assert!(message.contains("\"cam/7\""), "{message}");
        assert!(message.contains("'/' at position 4"), "{message}");
    }

    #[test]
    fn key_slots_display_and_parse() {
        for slot in KeySlot::ALL {
            assert_eq!(slot.to_string().parse::<KeySlot>().expect("parses"), slot);
        }
        assert_eq!(
            "Primary".parse::<KeySlot>().expect("case"),
            KeySlot::Primary
        );
        let error = "tertiary".parse::<KeySlot>().expect_err("unknown");
        assert_eq!(
            error.to_string(),
            "unknown key slot \"tertiary\"; expected `primary` or `secondary`"
        );
    }

    #[test]
    fn nonces_are_random_base64url() {
        let (a, b) = (new_nonce().expect("nonce"), new_nonce().expect("nonce"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 22);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[test]
    fn the_admin_token_digest_matches_and_refuses_another_token() {
        let token = generate_admin_token().expect("token");
        assert!(token.starts_with(ADMIN_TOKEN_PREFIX));
        assert_eq!(token.len(), ADMIN_TOKEN_PREFIX.len() + 43);
        let digest = admin_token_digest(&token);
        assert_eq!(digest.len(), 64);
        assert!(admin_token_matches(&token, &digest));
        assert!(admin_token_matches(
            &token,
            &format!(" {}\n", digest.to_uppercase())
        ));
        let other = generate_admin_token().expect("token");
        assert!(!admin_token_matches(&other, &digest));
        assert!(!admin_token_matches(&token, ""));
        assert!(!admin_token_matches("", &admin_token_digest("")));
    }
}
