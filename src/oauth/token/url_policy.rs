//! Which token endpoints may be contacted. Pure: no I/O.
//!
//! * `https` only; plain `http` only with `allow_http_loopback` and a loopback IP literal or
//!   `localhost` host. No userinfo, no fragment.
//! * Link-local, cloud-metadata, unspecified and (unless allowed) loopback addresses are refused
//!   **on the resolved address**: the HTTP client's resolver calls [`check_host_name`] and
//!   [`filter_resolved`], and reqwest connects to exactly the addresses the resolver hands back,
//!   so the check and the use are the same set (no TOCTOU / DNS rebinding window). IP-literal
//!   hosts never reach a resolver in reqwest, so [`validate_token_url`] checks them with the
//!   same rules.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use url::{Host, Url};

/// Host names of cloud metadata services (compared lowercase, without a trailing dot).
const FORBIDDEN_HOSTNAMES: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "metadata.azure.internal",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.tencentyun.com",
    "metadata.platformequinix.com",
];

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn forbidden_hostname(host: &str) -> bool {
    FORBIDDEN_HOSTNAMES.contains(&normalize_host(host).as_str())
}

fn is_localhost_name(host: &str) -> bool {
    normalize_host(host) == "localhost"
}

/// Why an address must not be connected to, or `None` if it is allowed.
fn forbidden_ip(ip: IpAddr, allow_loopback: bool) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4, allow_loopback),
        IpAddr::V6(v6) => {
            // IPv4-mapped (::ffff:a.b.c.d): the kernel connects to the IPv4 address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4, allow_loopback);
            }
            let seg = v6.segments();
            // NAT64 well-known prefix 64:ff9b::/96 embeds an IPv4 address.
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6].iter().all(|s| *s == 0) {
                let [a, b] = seg[6].to_be_bytes();
                let [c, d] = seg[7].to_be_bytes();
                if let Some(why) = forbidden_v4(Ipv4Addr::new(a, b, c, d), false) {
                    return Some(why);
                }
            }
            if v6.is_unspecified() {
                Some("unspecified address")
            } else if v6.is_loopback() {
                (!allow_loopback).then_some("loopback address")
            } else if (seg[0] & 0xffc0) == 0xfe80 {
                Some("link-local address")
            } else if v6 == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
                Some("cloud metadata address")
            } else if v6.is_multicast() {
                Some("multicast address")
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(v4: Ipv4Addr, allow_loopback: bool) -> Option<&'static str> {
    let o = v4.octets();
    if o[0] == 0 {
        Some("unspecified address (0.0.0.0/8)")
    } else if v4.is_loopback() {
        (!allow_loopback).then_some("loopback address")
    } else if v4.is_link_local() {
        Some("link-local address (169.254.0.0/16, includes cloud metadata)")
    } else if v4 == Ipv4Addr::new(100, 100, 100, 200) || v4 == Ipv4Addr::new(192, 0, 0, 192) {
        Some("cloud metadata address")
    } else if v4.is_broadcast() || v4.is_multicast() {
        Some("broadcast or multicast address")
    } else {
        None
    }
}

/// Validate a token endpoint URL. Pure; also used by spec validation.
///
/// Rules: absolute `https` URL with a host; `http` only when `allow_http_loopback` and the host
/// is a loopback IP literal or `localhost`; no userinfo; no fragment (RFC 6749 §3.2); IP-literal
/// hosts and known metadata host names are checked against the forbidden address ranges
/// (link-local, metadata, unspecified, multicast, and loopback unless `allow_http_loopback`).
/// The message never echoes the URL (it may contain secrets).
pub fn validate_token_url(url: &str, allow_http_loopback: bool) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("not a valid absolute URL ({e})"))?;
    check_url_parts(&parsed)?;
    let host = parsed.host().ok_or_else(|| "has no host".to_string())?;
    let is_loopback_host = check_url_host(host, allow_http_loopback)?;
    if parsed.scheme() == "http" {
        if !allow_http_loopback {
            return Err("must use https".to_string());
        }
        if !is_loopback_host {
            return Err(
                "plain http is only allowed for loopback hosts (127.0.0.1, [::1], localhost); \
                 use https"
                    .to_string(),
            );
        }
    }
    Ok(parsed)
}

/// Scheme (`https` or `http`; which one is allowed depends on the host), no userinfo, no
/// fragment.
fn check_url_parts(parsed: &Url) -> Result<(), String> {
    match parsed.scheme() {
        "https" | "http" => {}
        other => {
            let shown: String = other.chars().take(16).collect();
            return Err(format!("unsupported scheme \"{shown}\"; use https"));
        }
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(
            "must not contain user information (user:password@); put credentials in the client \
             secret"
                .to_string(),
        );
    }
    if parsed.fragment().is_some() {
        return Err("must not contain a fragment (#...)".to_string());
    }
    Ok(())
}

/// Refuse metadata names and forbidden IP literals; `Ok(true)` for an allowed loopback host.
fn check_url_host(host: Host<&str>, allow_http_loopback: bool) -> Result<bool, String> {
    match host {
        Host::Domain(d) => {
            if forbidden_hostname(d) {
                return Err(format!(
                    "host \"{}\" is a cloud metadata service",
                    normalize_host(d)
                ));
            }
            if !is_localhost_name(d) {
                return Ok(false);
            }
            if !allow_http_loopback {
                return Err("loopback hosts (localhost) are not allowed".to_string());
            }
            Ok(true)
        }
        Host::Ipv4(v4) => {
            if let Some(why) = forbidden_ip(IpAddr::V4(v4), allow_http_loopback) {
                return Err(format!("host {v4} is a forbidden {why}"));
            }
            Ok(v4.is_loopback())
        }
        Host::Ipv6(v6) => {
            if let Some(why) = forbidden_ip(IpAddr::V6(v6), allow_http_loopback) {
                return Err(format!("host [{v6}] is a forbidden {why}"));
            }
            Ok(v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
        }
    }
}

/// Marker error of the connect-time checks (returned through the HTTP client's resolver and
/// found again in its error chain, which is how a refusal is told apart from a DNS failure).
#[derive(Debug)]
pub(super) struct ForbiddenAddressError(String);

impl fmt::Display for ForbiddenAddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ForbiddenAddressError {}

/// What the resolver does with a host name, decided before any DNS query.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NameCheck {
    /// Answered without DNS: `localhost` (RFC 6761: never sent to DNS).
    Local(Vec<SocketAddr>),
    /// Look up this normalized name, then pass the answer through [`filter_resolved`].
    Lookup(String),
}

/// The resolver's name policy: metadata names are refused, `localhost` is answered locally
/// (and refused unless loopback is allowed), anything else goes to DNS.
pub(super) fn check_host_name(
    name: &str,
    allow_loopback: bool,
) -> Result<NameCheck, ForbiddenAddressError> {
    let host = normalize_host(name);
    if forbidden_hostname(&host) {
        return Err(ForbiddenAddressError(
            "the token host is a cloud metadata service".to_string(),
        ));
    }
    if host != "localhost" {
        return Ok(NameCheck::Lookup(host));
    }
    if !allow_loopback {
        return Err(ForbiddenAddressError(
            "loopback hosts are not allowed".to_string(),
        ));
    }
    Ok(NameCheck::Local(vec![
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
    ]))
}

/// Keep only allowed addresses; error if something was resolved but everything was refused.
pub(super) fn filter_resolved(
    addrs: impl IntoIterator<Item = SocketAddr>,
    allow_loopback: bool,
) -> Result<Vec<SocketAddr>, ForbiddenAddressError> {
    let mut kept = Vec::new();
    let mut refused: Option<&'static str> = None;
    for a in addrs {
        match forbidden_ip(a.ip(), allow_loopback) {
            None => kept.push(a),
            Some(why) => refused = refused.or(Some(why)),
        }
    }
    match (kept.is_empty(), refused) {
        (true, Some(why)) => Err(ForbiddenAddressError(format!(
            "the token host resolves only to forbidden addresses ({why})"
        ))),
        _ => Ok(kept),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_validation() {
        let ok = |u: &str, flag: bool| validate_token_url(u, flag).map(|_| ());
        assert!(ok("https://idp.example.com/oauth/token", false).is_ok());
        assert!(ok("https://idp.example.com:8443/t?tenant=a", false).is_ok());
        assert!(ok("https://10.1.2.3/token", false).is_ok());
        assert!(ok("http://idp.example.com/token", false).is_err());
        assert!(ok("http://idp.example.com/token", true).is_err());
        assert!(ok("http://127.0.0.1:8080/token", false).is_err());
        assert!(ok("http://127.0.0.1:8080/token", true).is_ok());
        assert!(ok("http://127.9.9.9/token", true).is_ok());
        assert!(ok("http://[::1]:8080/token", true).is_ok());
        assert!(ok("http://localhost:8080/token", true).is_ok());
        assert!(ok("http://LOCALHOST./token", true).is_ok());
        assert!(ok("https://localhost/token", false).is_err());
        assert!(ok("https://127.0.0.1/token", false).is_err());
        assert!(ok("https://[::1]/token", false).is_err());
        assert!(
            ok("https://0x7f.1/token", false).is_err(),
            "obfuscated loopback"
        );
        assert!(
            ok("https://2130706433/token", false).is_err(),
            "decimal loopback"
        );
        assert!(
            ok("http://10.0.0.1/token", true).is_err(),
            "http to non-loopback"
        );

        let e = ok("https://user:SECRETPW@idp.example.com/token", false).unwrap_err();
        assert!(
            e.contains("user information") && !e.contains("SECRETPW"),
            "{e}"
        );
        assert!(ok("https://user@idp.example.com/token", false).is_err());
        assert!(ok("https://idp.example.com/token#frag", false).is_err());
        assert!(ok("ftp://idp.example.com/token", false).is_err());
        assert!(ok("file:///etc/passwd", false).is_err());
        assert!(ok("/relative/token", false).is_err());
        assert!(ok("not a url", false).is_err());

        for bad in [
            "https://169.254.169.254/latest/meta-data",
            "https://169.254.1.1/token",
            "https://[fe80::1]/token",
            "https://[fd00:ec2::254]/token",
            "https://[::ffff:169.254.169.254]/token",
            "https://[64:ff9b::a9fe:a9fe]/token",
            "https://100.100.100.200/token",
            "https://0.0.0.0/token",
            "https://[::]/token",
            "https://metadata.google.internal/computeMetadata/v1/",
            "https://METADATA.GOOGLE.INTERNAL./x",
            "https://metadata/x",
            "https://224.0.0.1/x",
        ] {
            for flag in [false, true] {
                let e = ok(bad, flag).unwrap_err();
                assert!(
                    !e.contains("/latest") && !e.contains("computeMetadata"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn address_filtering_is_on_resolved_addresses() {
        let sa = |s: &str| -> SocketAddr { s.parse().unwrap() };
        // Rebinding-style answer mixing public and metadata: only the public one is used.
        let kept = filter_resolved(
            [
                sa("169.254.169.254:0"),
                sa("93.184.216.34:0"),
                sa("[fe80::1]:0"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(kept, vec![sa("93.184.216.34:0")]);
        // Only forbidden addresses: error.
        assert!(filter_resolved([sa("169.254.169.254:0")], true).is_err());
        assert!(filter_resolved([sa("[fd00:ec2::254]:0")], true).is_err());
        assert!(filter_resolved([sa("100.100.100.200:0")], true).is_err());
        assert!(filter_resolved([sa("0.0.0.0:0"), sa("[::]:0")], true).is_err());
        assert!(filter_resolved([sa("[::ffff:169.254.0.1]:0")], true).is_err());
        // Loopback only with the flag.
        assert!(filter_resolved([sa("127.0.0.1:0"), sa("[::1]:0")], false).is_err());
        assert_eq!(filter_resolved([sa("127.0.0.1:0")], true).unwrap().len(), 1);
        // Private ranges are allowed (in-cluster IdPs).
        assert_eq!(filter_resolved([sa("10.0.0.5:0")], false).unwrap().len(), 1);
        // Nothing resolved is not a policy error (DNS reports it).
        assert!(filter_resolved([], false).unwrap().is_empty());
    }

    #[test]
    fn resolver_name_policy() {
        let refused = |name: &str, allow: bool| check_host_name(name, allow).is_err();
        assert!(refused("metadata.google.internal", true));
        assert!(refused("METADATA.", true));
        assert!(refused("localhost", false));
        assert!(refused("LocalHost.", false));
        assert_eq!(
            check_host_name("Idp.Example.", false).unwrap(),
            NameCheck::Lookup("idp.example".to_string())
        );
        let Ok(NameCheck::Local(addrs)) = check_host_name("localhost.", true) else {
            panic!("localhost is answered locally")
        };
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && addrs.len() == 2);
    }
}
