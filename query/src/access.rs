//! Who may ask: the bearer-token check and the loopback test that the runtime's local API
//! and the hub's API share.
//!
//! A token is kept only as its SHA-256 in lowercase hex ([`token_digest`]). A fast hash is
//! enough because the tokens these APIs hand out carry 256 random bits: there is nothing to
//! guess. [`token_matches`] compares digests in constant time.

use std::fmt::Write as _;

use ring::{digest, hmac};

/// Key used only to blind both sides of the digest comparison (see [`token_matches`]); it
/// protects nothing by being secret.
const COMPARE_KEY: &[u8] = b"weir-admin-token-compare";

/// The SHA-256 of a token as 64 lowercase hex characters: what an API keeps of it.
pub fn token_digest(token: &str) -> String {
    digest::digest(&digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut out, byte| {
            // Writing to a String cannot fail.
            let _ = write!(out, "{byte:02x}");
            out
        })
}

/// Whether `token` hashes to `digest_hex` (hex, either case, surrounding whitespace
/// ignored). An empty token never matches.
///
/// The comparison takes the same time wherever the digests first differ: both sides are put
/// through HMAC and compared with `ring::hmac::verify`, ring's supported constant-time check.
pub fn token_matches(token: &str, digest_hex: &str) -> bool {
    if token.is_empty() {
        return false;
    }
    let actual = token_digest(token);
    let expected = digest_hex.trim().to_ascii_lowercase();
    let key = hmac::Key::new(hmac::HMAC_SHA256, COMPARE_KEY);
    let expected_tag = hmac::sign(&key, expected.as_bytes());
    hmac::verify(&key, actual.as_bytes(), expected_tag.as_ref()).is_ok()
}

/// Whether `name` (a host name or an IP literal, without brackets or port) is this
/// machine's loopback interface: a loopback IP, `localhost` or a name under `.localhost`.
pub fn is_loopback_name(name: &str) -> bool {
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_hex_sha256() {
        assert_eq!(
            token_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_token_matches_its_digest_in_any_case_and_nothing_else_does() {
        let digest = token_digest("weir_admin_secret");
        assert!(token_matches("weir_admin_secret", &digest));
        assert!(token_matches(
            "weir_admin_secret",
            &format!(" {}\n", digest.to_uppercase())
        ));
        assert!(!token_matches("weir_admin_secreT", &digest));
        assert!(!token_matches("weir_admin_secret", ""));
        assert!(!token_matches("", &token_digest("")));
    }

    #[test]
    fn loopback_names_are_the_loopback_ips_and_localhost() {
        for name in [
            "127.0.0.1",
            "127.3.4.5",
            "::1",
            "localhost",
            "LocalHost.",
            "a.localhost",
        ] {
            assert!(is_loopback_name(name), "{name}");
        }
        for name in [
            "10.0.0.1",
            "::",
            "example.com",
            "localhost.example.com",
            "notlocalhost",
        ] {
            assert!(!is_loopback_name(name), "{name}");
        }
    }
}
