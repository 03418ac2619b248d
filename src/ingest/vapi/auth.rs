//! Authentication of Vapi server messages (CONTRACT §4.4, `shared/reference/vapi-wire.md` §6),
//! checked on the raw body before it is parsed. Any one configured method passing is enough:
//!
//! * the plain shared secret in `X-Vapi-Secret`, or in `X-Vapi-Signature` (the header name
//!   Vapi's docs used from March to May 2025);
//! * `Authorization: Bearer <token>` (a Vapi bearer credential);
//! * HMAC as a Vapi webhook credential's `authenticationPlan` configures it: algorithm,
//!   signature and timestamp headers, payload format, prefix, hex/base64, base64 secret.
//!
//! Every comparison is constant-time: secrets and tokens are compared as SHA-256 digests (so
//! neither their bytes nor their length leak through timing), HMAC tags with
//! `Mac::verify_slice`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::{Secrets, VapiConfig, VapiHmacConfig};
use crate::server::constant_time_eq;

/// Headers that carry the plain shared secret, current name first.
pub const SECRET_HEADERS: [&str; 2] = ["x-vapi-secret", "x-vapi-signature"];

/// A timestamp above this is taken as milliseconds (1e11 seconds is the year 5138).
const MILLIS_THRESHOLD: f64 = 1.0e11;

/// The configured methods.
#[derive(Debug)]
pub struct Auth {
    secret: Option<Vec<u8>>,
    bearer: Option<Vec<u8>>,
    hmac: Option<HmacVerifier>,
    allow_unauthenticated: bool,
}

/// HMAC digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// HMAC-SHA256 (Vapi's default).
    Sha256,
    /// HMAC-SHA512.
    Sha512,
    /// HMAC-SHA1.
    Sha1,
}

/// How the signature is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Hexadecimal (either case).
    Hex,
    /// Base64 (standard or URL-safe alphabet, padding optional).
    Base64,
}

/// One piece of the signed payload.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Vec<u8>),
    Timestamp,
    Body,
}

/// Verifies HMAC signatures.
#[derive(Debug)]
pub struct HmacVerifier {
    key: Vec<u8>,
    algorithm: Algorithm,
    signature_header: HeaderName,
    timestamp_header: HeaderName,
    format: Vec<Part>,
    prefix: String,
    encoding: Encoding,
    tolerance: Duration,
}

impl Auth {
    /// Builds the methods from `[vapi]` and its resolved secrets. Errors only on what
    /// `check-config` already refuses (kept so a config built in code cannot slip through).
    pub fn from_config(cfg: &VapiConfig, secrets: &Secrets) -> Result<Auth, String> {
        let hmac = match (&cfg.hmac, &secrets.vapi_hmac_secret) {
            (Some(h), Some(secret)) => Some(HmacVerifier::from_config(h, secret)?),
            (Some(_), None) => return Err("vapi.hmac: secret is required".into()),
            _ => None,
        };
        Ok(Auth {
            secret: secrets.vapi_secret.as_ref().map(|s| s.as_bytes().to_vec()),
            bearer: secrets
                .vapi_bearer_token
                .as_ref()
                .map(|s| s.as_bytes().to_vec()),
            hmac,
            allow_unauthenticated: cfg.allow_unauthenticated,
        })
    }

    /// Whether any method is configured.
    pub fn is_configured(&self) -> bool {
        self.secret.is_some() || self.bearer.is_some() || self.hmac.is_some()
    }

    /// Checks a request; on failure, says why for each configured method (for the log, not
    /// for the caller).
    pub fn check(&self, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Result<(), String> {
        if !self.is_configured() {
            return if self.allow_unauthenticated {
                Ok(())
            } else {
                Err("no authentication is configured ([vapi] secret, bearer_token or hmac) and allow_unauthenticated is false".into())
            };
        }
        let mut why = Vec::new();
        if let Some(secret) = &self.secret {
            let given: Vec<&[u8]> = SECRET_HEADERS
                .iter()
                .filter_map(|h| headers.get(*h))
                .map(|v| trim(v.as_bytes()))
                .collect();
            if given.iter().any(|g| secret_eq(g, secret)) {
                return Ok(());
            }
            why.push(if given.is_empty() {
                "secret: no X-Vapi-Secret header"
            } else {
                "secret: wrong value"
            });
        }
        if let Some(token) = &self.bearer {
            match bearer(headers) {
                Some(given) if secret_eq(given, token) => return Ok(()),
                Some(_) => why.push("bearer: wrong token"),
                None => why.push("bearer: no Authorization: Bearer header"),
            }
        }
        if let Some(h) = &self.hmac {
            match h.verify(headers, body, now) {
                Ok(()) => return Ok(()),
                Err(e) => why.push(e),
            }
        }
        Err(why.join("; "))
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    b.get(start..end).unwrap_or_default()
}

/// Compares digests, so that the time taken says nothing about the secret's bytes or length.
fn secret_eq(given: &[u8], expected: &[u8]) -> bool {
    constant_time_eq(&Sha256::digest(given), &Sha256::digest(expected))
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = trim(headers.get("authorization")?.as_bytes());
    let space = v.iter().position(|c| *c == b' ')?;
    let (scheme, rest) = v.split_at(space);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| trim(rest))
}

impl HmacVerifier {
    /// Builds a verifier from `[vapi.hmac]` and its resolved secret.
    pub fn from_config(h: &VapiHmacConfig, secret: &str) -> Result<HmacVerifier, String> {
        let algorithm = match h.algorithm.as_str() {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            "sha1" => Algorithm::Sha1,
            other => return Err(format!("vapi.hmac.algorithm: unknown {other:?}")),
        };
        let encoding = match h.encoding.as_str() {
            "hex" => Encoding::Hex,
            "base64" => Encoding::Base64,
            other => return Err(format!("vapi.hmac.encoding: unknown {other:?}")),
        };
        let header = |key: &str, v: &str| {
            HeaderName::from_bytes(v.trim().to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("vapi.hmac.{key}: {v:?} is not a valid header name"))
        };
        Ok(HmacVerifier {
            key: h.key(secret)?,
            algorithm,
            signature_header: header("signature_header", &h.signature_header)?,
            timestamp_header: header("timestamp_header", &h.timestamp_header)?,
            format: parse_format(&h.payload_format),
            prefix: h.prefix.clone(),
            encoding,
            tolerance: h.tolerance.get(),
        })
    }

    /// Verifies one request's signature (and timestamp, when the payload includes it).
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), &'static str> {
        let sig = headers
            .get(&self.signature_header)
            .ok_or("hmac: no signature header")?;
        let sig = std::str::from_utf8(trim(sig.as_bytes())).map_err(|_| "hmac: bad signature")?;
        // Lenient on a missing prefix: the tag must still match, so accepting both forms
        // costs nothing and survives a credential edited on one side only.
        let sig = sig.strip_prefix(self.prefix.as_str()).unwrap_or(sig).trim();
        let tag = decode_signature(sig, self.encoding).ok_or("hmac: signature is not valid")?;
        let ts = if self.format.contains(&Part::Timestamp) {
            let t = headers
                .get(&self.timestamp_header)
                .ok_or("hmac: no timestamp header")?;
            let t = std::str::from_utf8(t.as_bytes())
                .map_err(|_| "hmac: bad timestamp")?
                .trim();
            check_timestamp(t, now, self.tolerance)?;
            Some(t)
        } else {
            None
        };
        let mut chunks: Vec<&[u8]> = Vec::with_capacity(self.format.len());
        for p in &self.format {
            chunks.push(match p {
                Part::Literal(l) => l,
                Part::Timestamp => ts.unwrap_or_default().as_bytes(),
                Part::Body => body,
            });
        }
        let ok = match self.algorithm {
            Algorithm::Sha256 => verify_mac::<Hmac<Sha256>>(&self.key, &chunks, &tag),
            Algorithm::Sha512 => verify_mac::<Hmac<sha2::Sha512>>(&self.key, &chunks, &tag),
            Algorithm::Sha1 => verify_mac::<Hmac<sha1::Sha1>>(&self.key, &chunks, &tag),
        };
        if ok {
            Ok(())
        } else {
            Err("hmac: signature does not match")
        }
    }
}

fn verify_mac<M: Mac + hmac::digest::KeyInit>(key: &[u8], chunks: &[&[u8]], tag: &[u8]) -> bool {
    let Ok(mut m) = <M as Mac>::new_from_slice(key) else {
        return false;
    };
    for c in chunks {
        m.update(c);
    }
    m.verify_slice(tag).is_ok()
}

/// Splits a payload format into literal text and the `{timestamp}` / `{body}` placeholders
/// (`check-config` refuses any other placeholder).
fn parse_format(f: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut rest = f;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{timestamp}") {
            parts.push(Part::Literal(std::mem::take(&mut lit).into_bytes()));
            parts.push(Part::Timestamp);
            rest = r;
        } else if let Some(r) = rest.strip_prefix("{body}") {
            parts.push(Part::Literal(std::mem::take(&mut lit).into_bytes()));
            parts.push(Part::Body);
            rest = r;
        } else {
            let mut chars = rest.chars();
            if let Some(c) = chars.next() {
                lit.push(c);
            }
            rest = chars.as_str();
        }
    }
    parts.push(Part::Literal(lit.into_bytes()));
    parts.retain(|p| !matches!(p, Part::Literal(l) if l.is_empty()));
    parts
}

fn decode_signature(sig: &str, enc: Encoding) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    match enc {
        Encoding::Hex => hex::decode(sig).ok(),
        Encoding::Base64 => [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|e| e.decode(sig).ok()),
    }
}

/// Unix seconds, or milliseconds when above [`MILLIS_THRESHOLD`]; fractions allowed.
fn check_timestamp(t: &str, now: SystemTime, tolerance: Duration) -> Result<(), &'static str> {
    let v: f64 = t.parse().map_err(|_| "hmac: timestamp is not a number")?;
    if !v.is_finite() || v < 0.0 {
        return Err("hmac: timestamp is not a number");
    }
    let secs = if v > MILLIS_THRESHOLD { v / 1000.0 } else { v };
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    if (now - secs).abs() > tolerance.as_secs_f64() {
        return Err("hmac: timestamp outside tolerance");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DurationValue;
    use axum::http::HeaderValue;

    fn hmac_cfg() -> VapiHmacConfig {
        VapiHmacConfig {
            secret: Some("k".into()),
            secret_file: None,
            secret_env: None,
            algorithm: "sha256".into(),
            signature_header: "x-signature".into(),
            timestamp_header: "x-timestamp".into(),
            payload_format: "{timestamp}.{body}".into(),
            prefix: String::new(),
            encoding: "hex".into(),
            secret_is_base64: false,
            tolerance: DurationValue(Duration::from_secs(300)),
        }
    }

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_773_335_000)
    }

    fn sign256(key: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
        m.update(msg);
        m.finalize().into_bytes().to_vec()
    }

    #[test]
    fn payload_formats() {
        assert_eq!(
            parse_format("{timestamp}.{body}"),
            vec![Part::Timestamp, Part::Literal(b".".to_vec()), Part::Body]
        );
        assert_eq!(parse_format("{body}"), vec![Part::Body]);
        assert_eq!(
            parse_format("v1:{timestamp}:{body}"),
            vec![
                Part::Literal(b"v1:".to_vec()),
                Part::Timestamp,
                Part::Literal(b":".to_vec()),
                Part::Body
            ]
        );
    }

    #[test]
    fn default_plan_signs_timestamp_dot_body() {
        let v = HmacVerifier::from_config(&hmac_cfg(), "k").unwrap();
        let body = br#"{"message":{"type":"hang"}}"#;
        let ts = "1773335000";
        let sig = hex::encode(sign256(b"k", &[ts.as_bytes(), b".", body].concat()));
        let h = headers(&[("x-signature", sig.clone()), ("x-timestamp", ts.into())]);
        assert_eq!(v.verify(&h, body, now()), Ok(()));
        // Upper-case hex is the same signature.
        let h = headers(&[
            ("x-signature", sig.to_uppercase()),
            ("x-timestamp", ts.into()),
        ]);
        assert_eq!(v.verify(&h, body, now()), Ok(()));
        assert_eq!(
            v.verify(&h, b"{\"message\":{\"type\":\"hang\"} }", now()),
            Err("hmac: signature does not match")
        );
        let h = headers(&[("x-signature", sig)]);
        assert_eq!(v.verify(&h, body, now()), Err("hmac: no timestamp header"));
    }

    #[test]
    fn timestamps_in_seconds_or_millis_within_tolerance() {
        let tol = Duration::from_secs(300);
        assert!(check_timestamp("1773335000", now(), tol).is_ok());
        assert!(check_timestamp("1773335000123", now(), tol).is_ok());
        assert!(check_timestamp("1773335299.5", now(), tol).is_ok());
        assert!(check_timestamp("1773334600", now(), tol).is_err());
        assert!(check_timestamp("1773335301000", now(), tol).is_err());
        assert!(check_timestamp("soon", now(), tol).is_err());
        assert!(check_timestamp("-5", now(), tol).is_err());
    }

    #[test]
    fn secrets_and_bearer_compare_whole_values() {
        let cfg = VapiConfig::default();
        let secrets = Secrets {
            vapi_secret: Some("s3cret".into()),
            vapi_bearer_token: Some("tok".into()),
            ..Secrets::default()
        };
        let a = Auth::from_config(&cfg, &secrets).unwrap();
        let ok = |h: HeaderMap| a.check(&h, b"{}", now()).is_ok();
        assert!(ok(headers(&[("x-vapi-secret", "s3cret".into())])));
        assert!(ok(headers(&[("x-vapi-signature", "s3cret".into())])));
        assert!(!ok(headers(&[("x-vapi-secret", "s3cre".into())])));
        assert!(!ok(headers(&[("x-vapi-secret", "s3cretX".into())])));
        assert!(ok(headers(&[("authorization", "Bearer tok".into())])));
        assert!(ok(headers(&[("authorization", "bearer  tok ".into())])));
        assert!(!ok(headers(&[("authorization", "Basic tok".into())])));
        assert!(!ok(headers(&[("authorization", "Bearer tok2".into())])));
        assert!(!ok(HeaderMap::new()));
    }

    #[test]
    fn nothing_configured_needs_the_explicit_opt_out() {
        let mut cfg = VapiConfig::default();
        let a = Auth::from_config(&cfg, &Secrets::default()).unwrap();
        assert!(a.check(&HeaderMap::new(), b"{}", now()).is_err());
        cfg.allow_unauthenticated = true;
        let a = Auth::from_config(&cfg, &Secrets::default()).unwrap();
        assert!(a.check(&HeaderMap::new(), b"{}", now()).is_ok());
    }
}
