//! Which token endpoints may be contacted. Pure: no I/O.
//!
//! * `https` only; plain `http` only with `allow_http_loopback` and a loopback IP literal or
//!   `localhost` host. No userinfo, no fragment.
//! * Every address falls in one of four classes ([`classify`]): **forbidden** (link-local, cloud
//!   metadata, unspecified, multicast/broadcast: never contacted), **loopback** (only with
//!   `allow_http_loopback`), **private** (RFC 1918, 100.64.0.0/10 CGNAT, fc00::/7 ULA and the
//!   other non-global ranges below: only when the operator's [`TokenUrlPolicy`] allows the host
//!   name or the address) and **public**. A namespace user could otherwise point a token URL at
//!   any in-cluster service and read the outcome from the status.
//! * The rules apply **to the resolved address**: the HTTP client's resolver calls
//!   [`check_host_name`] and [`filter_resolved`], and reqwest connects to exactly the addresses
//!   the resolver hands back, so the check and the use are the same set (no TOCTOU / DNS
//!   rebinding window). IP-literal hosts never reach a resolver in reqwest, so
//!   [`validate_token_url`] checks them with the same rules.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
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

// ---------------------------------------------------------------------------------------------
// Address classes
// ---------------------------------------------------------------------------------------------

/// What an address is, for the token client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddrClass {
    /// Never contacted, whatever the configuration.
    Forbidden(&'static str),
    /// Contacted only with `allow_http_loopback`.
    Loopback,
    /// Contacted only when the [`TokenUrlPolicy`] allows the host name or the address.
    Private(&'static str),
    Public,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(s: [u16; 8], len: u8) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
        len,
    )
}

/// IPv4 ranges, most specific first (the metadata addresses lie inside larger ranges).
const V4_RANGES: &[(Ipv4Net, AddrClass)] = &[
    (
        v4(0, 0, 0, 0, 8),
        AddrClass::Forbidden("unspecified address (0.0.0.0/8)"),
    ),
    (v4(127, 0, 0, 0, 8), AddrClass::Loopback),
    (
        v4(169, 254, 0, 0, 16),
        AddrClass::Forbidden("link-local address (169.254.0.0/16, includes cloud metadata)"),
    ),
    (
        v4(100, 100, 100, 200, 32),
        AddrClass::Forbidden("cloud metadata address"),
    ),
    (
        v4(192, 0, 0, 192, 32),
        AddrClass::Forbidden("cloud metadata address"),
    ),
    (
        v4(255, 255, 255, 255, 32),
        AddrClass::Forbidden("broadcast or multicast address"),
    ),
    (
        v4(224, 0, 0, 0, 4),
        AddrClass::Forbidden("broadcast or multicast address"),
    ),
    (
        v4(10, 0, 0, 0, 8),
        AddrClass::Private("private address (10.0.0.0/8)"),
    ),
    (
        v4(172, 16, 0, 0, 12),
        AddrClass::Private("private address (172.16.0.0/12)"),
    ),
    (
        v4(192, 168, 0, 0, 16),
        AddrClass::Private("private address (192.168.0.0/16)"),
    ),
    (
        v4(100, 64, 0, 0, 10),
        AddrClass::Private("shared address space (100.64.0.0/10, carrier-grade NAT)"),
    ),
    (
        v4(192, 0, 0, 0, 24),
        AddrClass::Private("IETF protocol assignment (192.0.0.0/24)"),
    ),
    (
        v4(198, 18, 0, 0, 15),
        AddrClass::Private("benchmarking address (198.18.0.0/15)"),
    ),
    (
        v4(240, 0, 0, 0, 4),
        AddrClass::Private("reserved address (240.0.0.0/4)"),
    ),
];

/// IPv6 ranges that do not embed an IPv4 address, most specific first.
const V6_RANGES: &[(Ipv6Net, AddrClass)] = &[
    (
        v6([0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254], 128),
        AddrClass::Forbidden("cloud metadata address"),
    ),
    (
        v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        AddrClass::Forbidden("link-local address"),
    ),
    (
        v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
        AddrClass::Forbidden("multicast address"),
    ),
    (
        v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        AddrClass::Private("local-use NAT64 address (64:ff9b:1::/48)"),
    ),
    (
        v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        AddrClass::Private("unique local address (fc00::/7)"),
    ),
    (
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        AddrClass::Private("site-local address (fec0::/10)"),
    ),
];

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    V4_RANGES
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map_or(AddrClass::Public, |(_, class)| *class)
}

/// An IPv4 address reached through a translator (NAT64, 6to4): its class, except that the
/// translator's idea of loopback is never ours to allow.
fn classify_translated(ip: Ipv4Addr) -> AddrClass {
    match classify_v4(ip) {
        AddrClass::Loopback => AddrClass::Forbidden("loopback address behind an IPv6 translator"),
        other => other,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    // IPv4-mapped (::ffff:a.b.c.d): the kernel connects to the IPv4 address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if ip.is_unspecified() {
        return AddrClass::Forbidden("unspecified address");
    }
    if ip.is_loopback() {
        return AddrClass::Loopback;
    }
    let seg = ip.segments();
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    // Deprecated IPv4-compatible addresses (::a.b.c.d): nothing legitimate uses them.
    if seg[..6].iter().all(|s| *s == 0) {
        return AddrClass::Forbidden("deprecated IPv4-compatible address");
    }
    // NAT64 well-known prefix 64:ff9b::/96 embeds the IPv4 address in the last 32 bits.
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6].iter().all(|s| *s == 0) {
        return classify_translated(embedded(seg[6], seg[7]));
    }
    // 6to4 (2002:a.b.c.d::/48) embeds the IPv4 address in bits 16..48.
    if seg[0] == 0x2002 {
        return classify_translated(embedded(seg[1], seg[2]));
    }
    V6_RANGES
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map_or(AddrClass::Public, |(_, class)| *class)
}

/// The class of an address (see the module documentation).
fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`, everything else unchanged: allow-list entries match either
/// spelling.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

// ---------------------------------------------------------------------------------------------
// The operator's allow-list
// ---------------------------------------------------------------------------------------------

/// A host name pattern of the allow-list, normalized like a URL's host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// `idp.internal`: this name only.
    Exact(String),
    /// `*.svc.cluster.local`, stored as `.svc.cluster.local`: any name below it (not the
    /// suffix itself).
    Below(String),
}

impl HostPattern {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Below(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Below(s) => write!(f, "*{s}"),
        }
    }
}

/// A bad `--token-url-allow` entry: which one and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token URL allow-list entry {entry:?}: {why}")]
pub struct AllowEntryError {
    entry: String,
    why: String,
}

/// The operator's allow-list for token hosts on private networks (`--token-url-allow`, chart
/// value `tokenUrlAllow`): host names (`idp.internal`, `*.svc.cluster.local`), IP addresses and
/// CIDRs (`10.20.0.0/16`, `fd00::/8`), comma-separated. It only lifts the private-range rule:
/// forbidden addresses stay forbidden and loopback stays governed by `allow_http_loopback`.
/// The empty policy (the default) allows no private address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenUrlPolicy {
    hosts: Vec<HostPattern>,
    nets: Vec<IpNet>,
    /// Ranges classified private in addition to the built-in ones, checked first. Only tests
    /// set it (to put 127.0.0.0/8 under the allow-list and exercise the rule on loopback).
    extra_private: Vec<IpNet>,
}

impl TokenUrlPolicy {
    /// Whether nothing is allowed beyond the built-in rules.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.nets.is_empty()
    }

    /// Whether the host name (as a URL spells it) is allow-listed by name.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.hosts.iter().any(|p| p.matches(&host))
    }

    /// Whether the address is in an allow-listed range.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let c = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip) || n.contains(&c))
    }

    /// The class of `ip` under this policy (the built-in class, or private for the test-only
    /// extra ranges).
    fn classify(&self, ip: IpAddr) -> AddrClass {
        let c = canonical(ip);
        if self.extra_private.iter().any(|n| n.contains(&c)) {
            return AddrClass::Private("address in a range the policy treats as private");
        }
        classify(ip)
    }

    /// Treat `nets` as private networks too. Tests must never contact a real private address,
    /// so loopback ranges stand in for one (`--token-url-private-ranges-for-tests`).
    pub fn with_private_ranges(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.extra_private.extend(nets);
        self
    }

    /// [`Self::with_private_ranges`] with one CIDR.
    #[cfg(test)]
    pub(crate) fn with_private_range(self, net: &str) -> Self {
        self.with_private_ranges([net.parse().expect("a CIDR")])
    }

    fn parse_entry(&mut self, entry: &str) -> Result<(), AllowEntryError> {
        let err = |why: &str| AllowEntryError {
            entry: entry.chars().take(100).collect(),
            why: why.to_string(),
        };
        if entry.contains("://") {
            return Err(err(
                "is a URL; give a host name, an IP address or a CIDR (no scheme, port or path)",
            ));
        }
        if entry.contains('/') {
            let net: IpNet = entry
                .parse()
                .map_err(|_| err("is not a valid CIDR (like 10.20.0.0/16 or fd00::/8)"))?;
            return self.push_net(canonical_net(net.trunc()), &err);
        }
        let bare = entry
            .strip_prefix('[')
            .and_then(|e| e.strip_suffix(']'))
            .unwrap_or(entry);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            let ip = canonical(ip);
            let len = if ip.is_ipv4() { 32 } else { 128 };
            return self.push_net(IpNet::new_assert(ip, len), &err);
        }
        let (wildcard, name) = match entry.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, entry),
        };
        if name.contains(['*', ':', '[', ']']) {
            return Err(err(
                "is not a host name, IP address or CIDR (a port is not part of an entry; a wildcard only as a leading \"*.\")",
            ));
        }
        // Normalized by the same parser as token URLs, so the comparison sees what the
        // request will use (lowercase, punycode, numeric IPv4 spellings).
        let host = match Host::parse(name) {
            // At most the one trailing dot of a fully qualified name: normalizing drops every
            // trailing dot, and what is left could spell a number (`14169..` → `14169`), which
            // no URL host ever matches as a name.
            Ok(Host::Domain(d))
                if d.strip_suffix('.')
                    .unwrap_or(&d)
                    .split('.')
                    .any(str::is_empty) =>
            {
                return Err(err("is not a valid host name"))
            }
            Ok(Host::Domain(d)) => normalize_host(&d),
            Ok(Host::Ipv4(ip)) if !wildcard => {
                return self.push_net(IpNet::new_assert(IpAddr::V4(ip), 32), &err)
            }
            _ => return Err(err("is not a valid host name, IP address or CIDR")),
        };
        // Checked after decoding (`%2A` is a `*`, `%2C` a comma the list would split at): a
        // host name is letters, digits, `-`, `_` and dots (IDNA names are punycode by now).
        let name_char = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.';
        if host.is_empty() || host.split('.').any(str::is_empty) || !host.bytes().all(name_char) {
            return Err(err("is not a valid host name"));
        }
        if forbidden_hostname(&host) {
            return Err(err("is a cloud metadata service, which is never contacted"));
        }
        if is_localhost_name(&host) {
            return Err(err(
                "is loopback, which only the allow-http-loopback setting governs",
            ));
        }
        self.hosts.push(if wildcard {
            HostPattern::Below(format!(".{host}"))
        } else {
            HostPattern::Exact(host)
        });
        Ok(())
    }

    fn push_net(
        &mut self,
        net: IpNet,
        err: &dyn Fn(&str) -> AllowEntryError,
    ) -> Result<(), AllowEntryError> {
        // An entry lying wholly inside a range that is never contacted (or that only the
        // loopback setting governs) would do nothing: say so instead of accepting it.
        let never =
            |class: &AddrClass| matches!(class, AddrClass::Forbidden(_) | AddrClass::Loopback);
        let blocked = match net {
            IpNet::V4(n) => V4_RANGES.iter().any(|(r, c)| never(c) && r.contains(&n)),
            IpNet::V6(n) => {
                V6_RANGES.iter().any(|(r, c)| never(c) && r.contains(&n))
                    || (n.prefix_len() == 128 && never(&classify_v6(n.addr())))
            }
        };
        if blocked {
            return Err(err(
                "lies in a range that is never contacted (loopback, link-local, cloud metadata, multicast, unspecified)",
            ));
        }
        self.nets.push(net);
        Ok(())
    }
}

/// `::ffff:a.b.c.d/len` (len ≥ 96) as `a.b.c.d/(len-96)`: mapped addresses are canonicalized
/// the same way before matching.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new_assert(v4, n.prefix_len() - 96)),
            None => net,
        },
        other => other,
    }
}

impl FromStr for TokenUrlPolicy {
    type Err = AllowEntryError;

    /// Comma-separated entries; blanks around entries and empty entries are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut policy = TokenUrlPolicy::default();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            policy.parse_entry(entry)?;
        }
        Ok(policy)
    }
}

impl fmt::Display for TokenUrlPolicy {
    /// The normalized entries, comma-separated (for the start-up log).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts = self.hosts.iter().map(ToString::to_string);
        let nets = self.nets.iter().map(ToString::to_string);
        let all: Vec<String> = hosts.chain(nets).collect();
        f.write_str(&all.join(","))
    }
}

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Never contacted (or loopback without `allow_http_loopback`).
    Forbidden(&'static str),
    /// A private address the policy does not allow.
    NotAllowed(&'static str),
}

/// Whether `ip` may be contacted. `host_allowed`: the host name it was resolved from is
/// allow-listed by name.
fn check_ip(
    ip: IpAddr,
    host_allowed: bool,
    policy: &TokenUrlPolicy,
    allow_loopback: bool,
) -> Result<(), Refusal> {
    match policy.classify(ip) {
        AddrClass::Public => Ok(()),
        AddrClass::Forbidden(why) => Err(Refusal::Forbidden(why)),
        AddrClass::Loopback if allow_loopback => Ok(()),
        AddrClass::Loopback => Err(Refusal::Forbidden("loopback address")),
        AddrClass::Private(_) if host_allowed || policy.allows_ip(ip) => Ok(()),
        AddrClass::Private(why) => Err(Refusal::NotAllowed(why)),
    }
}

// ---------------------------------------------------------------------------------------------
// The token URL
// ---------------------------------------------------------------------------------------------

/// Why a token URL is refused before anything is sent. The messages never echo the URL (it
/// may contain secrets).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The URL breaks the URL rules (scheme, userinfo, fragment, forbidden host).
    #[error("{0}")]
    Invalid(String),
    /// The host is a private address the operator's [`TokenUrlPolicy`] does not allow.
    #[error("{0}")]
    NotAllowed(String),
}

/// What to do when a token URL's host is not allowed: the message shown in the status.
pub const NOT_ALLOWED_ADVICE: &str = "Ask the operator's administrator to add the host or its \
     CIDR to --token-url-allow (Helm value tokenUrlAllow) if this endpoint is meant to be used";

/// Validate a token endpoint URL. Pure; also used by spec validation.
///
/// Rules: absolute `https` URL with a host; `http` only when `allow_http_loopback` and the host
/// is a loopback IP literal or `localhost`; no userinfo; no fragment (RFC 6749 §3.2); known
/// metadata host names are refused, and IP-literal hosts (in any spelling the URL parser
/// accepts: `0x0a000001`, `[::ffff:10.0.0.1]`, …) are classified like resolved addresses.
pub fn validate_token_url(
    url: &str,
    allow_http_loopback: bool,
    policy: &TokenUrlPolicy,
) -> Result<Url, UrlError> {
    let invalid = |m: &str| UrlError::Invalid(m.to_string());
    let parsed = Url::parse(url)
        .map_err(|e| UrlError::Invalid(format!("not a valid absolute URL ({e})")))?;
    check_url_parts(&parsed).map_err(UrlError::Invalid)?;
    let host = parsed.host().ok_or_else(|| invalid("has no host"))?;
    let is_loopback_host = check_url_host(host, allow_http_loopback, policy)?;
    if parsed.scheme() == "http" {
        if !allow_http_loopback {
            return Err(invalid("must use https"));
        }
        if !is_loopback_host {
            return Err(invalid(
                "plain http is only allowed for loopback hosts (127.0.0.1, [::1], localhost); \
                 use https",
            ));
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

/// Refuse metadata names and IP literals the rules refuse; `Ok(true)` for an allowed loopback
/// host.
fn check_url_host(
    host: Host<&str>,
    allow_http_loopback: bool,
    policy: &TokenUrlPolicy,
) -> Result<bool, UrlError> {
    let ip = match host {
        Host::Domain(d) => {
            if forbidden_hostname(d) {
                return Err(UrlError::Invalid(format!(
                    "host \"{}\" is a cloud metadata service",
                    normalize_host(d)
                )));
            }
            if !is_localhost_name(d) {
                return Ok(false);
            }
            if !allow_http_loopback {
                return Err(UrlError::Invalid(
                    "loopback hosts (localhost) are not allowed".to_string(),
                ));
            }
            return Ok(true);
        }
        Host::Ipv4(v4) => IpAddr::V4(v4),
        Host::Ipv6(v6) => IpAddr::V6(v6),
    };
    let shown = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    match check_ip(ip, false, policy, allow_http_loopback) {
        Ok(()) => Ok(classify(ip) == AddrClass::Loopback),
        Err(Refusal::Forbidden(why)) => Err(UrlError::Invalid(format!(
            "host {shown} is a forbidden {why}"
        ))),
        Err(Refusal::NotAllowed(why)) => Err(UrlError::NotAllowed(format!(
            "host {shown} is a {why}, which the operator does not contact unless allowed. \
             {NOT_ALLOWED_ADVICE}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// The resolver's rules
// ---------------------------------------------------------------------------------------------

/// Marker error of the connect-time checks (returned through the HTTP client's resolver and
/// found again in its error chain, which is how a refusal is told apart from a DNS failure).
#[derive(Debug)]
pub(super) struct ForbiddenAddressError {
    /// A private address the policy does not allow (rather than a forbidden one).
    pub(super) not_allowed: bool,
    message: String,
}

impl ForbiddenAddressError {
    fn forbidden(message: impl Into<String>) -> Self {
        ForbiddenAddressError {
            not_allowed: false,
            message: message.into(),
        }
    }
}

impl fmt::Display for ForbiddenAddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ForbiddenAddressError {}

/// What the resolver does with a host name, decided before any DNS query.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NameCheck {
    /// Answered without DNS: `localhost` (RFC 6761: never sent to DNS).
    Local(Vec<SocketAddr>),
    /// Look up this normalized name, then pass the answer through [`filter_resolved`].
    Lookup {
        host: String,
        /// The name is allow-listed: its private addresses may be used.
        allow_listed: bool,
    },
}

/// The resolver's name policy: metadata names are refused, `localhost` is answered locally
/// (and refused unless loopback is allowed), anything else goes to DNS.
pub(super) fn check_host_name(
    name: &str,
    allow_loopback: bool,
    policy: &TokenUrlPolicy,
) -> Result<NameCheck, ForbiddenAddressError> {
    let host = normalize_host(name);
    if forbidden_hostname(&host) {
        return Err(ForbiddenAddressError::forbidden(
            "the token host is a cloud metadata service",
        ));
    }
    if host != "localhost" {
        let allow_listed = policy.allows_host(&host);
        return Ok(NameCheck::Lookup { host, allow_listed });
    }
    if !allow_loopback {
        return Err(ForbiddenAddressError::forbidden(
            "loopback hosts are not allowed",
        ));
    }
    Ok(NameCheck::Local(vec![
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
    ]))
}

/// Keep only the addresses that may be contacted; error if something was resolved but
/// everything was refused. A refused private address makes the error a "not allowed" one
/// (allow-listing would help); otherwise it is "forbidden".
pub(super) fn filter_resolved(
    addrs: impl IntoIterator<Item = SocketAddr>,
    host_allowed: bool,
    policy: &TokenUrlPolicy,
    allow_loopback: bool,
) -> Result<Vec<SocketAddr>, ForbiddenAddressError> {
    let mut kept = Vec::new();
    let mut forbidden: Option<&'static str> = None;
    let mut not_allowed: Option<&'static str> = None;
    for a in addrs {
        match check_ip(a.ip(), host_allowed, policy, allow_loopback) {
            Ok(()) => kept.push(a),
            Err(Refusal::Forbidden(why)) => forbidden = forbidden.or(Some(why)),
            Err(Refusal::NotAllowed(why)) => not_allowed = not_allowed.or(Some(why)),
        }
    }
    if !kept.is_empty() {
        return Ok(kept);
    }
    match (not_allowed, forbidden) {
        (Some(why), _) => Err(ForbiddenAddressError {
            not_allowed: true,
            message: format!("the token host resolves only to addresses the operator's policy does not allow ({why})"),
        }),
        (None, Some(why)) => Err(ForbiddenAddressError::forbidden(format!(
            "the token host resolves only to forbidden addresses ({why})"
        ))),
        // Nothing resolved is not a policy error (DNS reports it).
        (None, None) => Ok(kept),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> TokenUrlPolicy {
        TokenUrlPolicy::default()
    }

    fn policy(s: &str) -> TokenUrlPolicy {
        s.parse().unwrap()
    }

    #[test]
    fn url_validation() {
        let ok = |u: &str, flag: bool| validate_token_url(u, flag, &none()).map(|_| ());
        assert!(ok("https://idp.example.com/oauth/token", false).is_ok());
        assert!(ok("https://idp.example.com:8443/t?tenant=a", false).is_ok());
        assert!(ok("https://93.184.216.34/token", false).is_ok());
        assert!(ok("http://idp.example.com/token", false).is_err());
        assert!(ok("http://idp.example.com/token", true).is_err());
        assert!(ok("http://127.0.0.1:8080/token", false).is_err());
        assert!(ok("http://127.0.0.1:8080/token", true).is_ok());
        assert!(ok("http://127.9.9.9/token", true).is_ok());
        assert!(ok("http://[::1]:8080/token", true).is_ok());
        assert!(ok("http://[::ffff:127.0.0.1]:8080/token", true).is_ok());
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
            ok("http://93.184.216.34/token", true).is_err(),
            "http to non-loopback"
        );

        let e = ok("https://user:SECRETPW@idp.example.com/token", false)
            .unwrap_err()
            .to_string();
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

        // Never contacted, whatever the flags and however broad the allow-list.
        let everything = policy("0.0.0.0/0,::/0");
        for bad in [
            "https://169.254.169.254/latest/meta-data",
            "https://169.254.1.1/token",
            "https://[fe80::1]/token",
            "https://[fd00:ec2::254]/token",
            "https://[::ffff:169.254.169.254]/token",
            "https://[64:ff9b::a9fe:a9fe]/token",
            "https://[64:ff9b::7f00:1]/token",
            "https://[2002:7f00:1::]/token",
            "https://[::10.0.0.1]/token",
            "https://100.100.100.200/token",
            "https://192.0.0.192/token",
            "https://0.0.0.0/token",
            "https://[::]/token",
            "https://metadata.google.internal/computeMetadata/v1/",
            "https://METADATA.GOOGLE.INTERNAL./x",
            "https://metadata/x",
            "https://224.0.0.1/x",
            "https://255.255.255.255/x",
            "https://[ff02::1]/x",
        ] {
            for flag in [false, true] {
                for p in [&none(), &everything] {
                    let e = validate_token_url(bad, flag, p).unwrap_err();
                    assert!(matches!(e, UrlError::Invalid(_)), "{bad}: {e:?}");
                    let e = e.to_string();
                    assert!(
                        !e.contains("/latest") && !e.contains("computeMetadata"),
                        "{e}"
                    );
                }
            }
        }
    }

    /// Every private range, in the spellings the URL parser normalizes to the same address.
    const PRIVATE_URLS: &[&str] = &[
        "https://10.1.2.3/token",
        "https://10.0.0.1./token",
        "https://0x0a000001/token",
        "https://0xa.0.0.1/token",
        "https://012.0.0.1/token",
        "https://167772161/token",
        "https://10.1/token",
        "https://[::ffff:10.0.0.1]/token",
        "https://[::ffff:a00:1]/token",
        "https://[64:ff9b::a00:1]/token",
        "https://[2002:a00:1::1]/token",
        "https://172.16.0.1/token",
        "https://172.31.255.255/token",
        "https://192.168.1.1/token",
        "https://[::ffff:192.168.1.1]/token",
        "https://100.64.0.1/token",
        "https://100.127.255.254/token",
        "https://192.0.0.8/token",
        "https://198.18.0.1/token",
        "https://240.0.0.1/token",
        "https://[fc00::1]/token",
        "https://[fd12:3456:789a::1]/token",
        "https://[FDFF:FFFF::1]/token",
        "https://[fec0::1]/token",
        "https://[64:ff9b:1::1]/token",
    ];

    #[test]
    fn private_ranges_are_refused_unless_allowed() {
        for url in PRIVATE_URLS {
            for flag in [false, true] {
                let e = validate_token_url(url, flag, &none()).unwrap_err();
                let UrlError::NotAllowed(msg) = &e else {
                    panic!("{url}: {e:?}")
                };
                assert!(msg.contains("--token-url-allow"), "{msg}");
                assert!(!msg.contains("/token"), "the URL is not echoed: {msg}");
            }
            assert!(
                validate_token_url(url, false, &policy("0.0.0.0/0,::/0")).is_ok(),
                "{url} with everything allowed"
            );
        }
        // Just outside the ranges: public.
        for url in [
            "https://9.255.255.255/token",
            "https://11.0.0.0/token",
            "https://172.15.255.255/token",
            "https://172.32.0.0/token",
            "https://192.167.255.255/token",
            "https://192.169.0.0/token",
            "https://100.63.255.255/token",
            "https://100.128.0.0/token",
            "https://198.20.0.0/token",
            "https://[fbff:ffff::1]/token",
            "https://[2606:4700::1]/token",
            "https://[64:ff9b::5db8:d822]/token",
            "https://[2002:5db8:d822::1]/token",
        ] {
            assert!(
                validate_token_url(url, false, &none()).is_ok(),
                "{url} is public"
            );
        }
    }

    #[test]
    fn allow_list_by_cidr_and_address() {
        let p = policy("10.20.0.0/16, 192.168.7.7, [fd00::1], fd12::/16, ::ffff:172.16.0.0/112");
        let ok = |u: &str| validate_token_url(u, false, &p).is_ok();
        assert!(ok("https://10.20.1.2/token"));
        assert!(
            ok("https://0x0a140102/token"),
            "numeric spelling of 10.20.1.2"
        );
        assert!(ok("https://[::ffff:10.20.1.2]/token"), "mapped spelling");
        assert!(!ok("https://10.21.0.1/token"));
        assert!(ok("https://192.168.7.7/token"));
        assert!(!ok("https://192.168.7.8/token"));
        assert!(ok("https://[fd00::1]/token"));
        assert!(!ok("https://[fd00::2]/token"));
        assert!(ok("https://[fd12:ab::1]/token"));
        assert!(!ok("https://[fd13::1]/token"));
        assert!(ok("https://172.16.5.5/token"), "mapped CIDR entry");
        assert!(!ok("https://172.17.0.1/token"));
        // The same entries decide on resolved addresses.
        let sa = |s: &str| -> SocketAddr { s.parse().unwrap() };
        assert_eq!(
            filter_resolved([sa("10.20.0.9:443"), sa("10.30.0.9:443")], false, &p, false).unwrap(),
            vec![sa("10.20.0.9:443")]
        );
        let e = filter_resolved([sa("10.30.0.9:443")], false, &p, false).unwrap_err();
        assert!(e.not_allowed, "{e}");
    }

    #[test]
    fn allow_list_by_host_name() {
        let p = policy("IDP.Internal., *.svc.cluster.local");
        assert!(p.allows_host("idp.internal"));
        assert!(p.allows_host("IDP.INTERNAL."));
        assert!(!p.allows_host("x.idp.internal"));
        assert!(!p.allows_host("idp.internal.evil.example"));
        assert!(p.allows_host("keycloak.auth.svc.cluster.local"));
        assert!(p.allows_host("a.svc.cluster.local"));
        assert!(!p.allows_host("svc.cluster.local"));
        assert!(!p.allows_host("evilsvc.cluster.local"));
        assert!(!p.allows_ip("10.0.0.1".parse().unwrap()));
        assert_eq!(
            check_host_name("Keycloak.Auth.svc.cluster.local.", false, &p).unwrap(),
            NameCheck::Lookup {
                host: "keycloak.auth.svc.cluster.local".into(),
                allow_listed: true
            }
        );
        let sa = |s: &str| -> SocketAddr { s.parse().unwrap() };
        // A name allow-listed by name may use its private addresses, never forbidden ones.
        let mixed = [sa("10.96.0.10:443"), sa("169.254.169.254:443")];
        assert_eq!(
            filter_resolved(mixed, true, &p, false).unwrap(),
            vec![sa("10.96.0.10:443")]
        );
        let e = filter_resolved([sa("169.254.169.254:443")], true, &p, true).unwrap_err();
        assert!(!e.not_allowed);
        // A name that is not allow-listed may not use them.
        let e = filter_resolved(
            [sa("10.96.0.10:443"), sa("[fd00::5]:443")],
            false,
            &p,
            false,
        )
        .unwrap_err();
        assert!(e.not_allowed);
        assert!(e.to_string().contains("does not allow"), "{e}");
        // A literal is never allowed by a host entry.
        assert!(matches!(
            validate_token_url("https://10.96.0.10/token", false, &p),
            Err(UrlError::NotAllowed(_))
        ));
    }

    #[test]
    fn allow_list_entries_parse_and_normalize() {
        let p = policy(
            " idp.internal , 10.1.2.3/8 ,, fd00::/8, 0x0a000001, [fd00::1], *.Svc.Cluster.Local ",
        );
        assert_eq!(
            p.to_string(),
            "idp.internal,*.svc.cluster.local,10.0.0.0/8,fd00::/8,10.0.0.1/32,fd00::1/128"
        );
        assert!(policy("").is_empty());
        assert!(policy(" , ").is_empty());
        assert_eq!(policy(""), TokenUrlPolicy::default());
    }

    /// Found by the `url_policy` fuzz target: an entry ending in two dots was taken as a host
    /// name without them, which can spell a number (`14169..` became `14169`, an IPv4 address
    /// in the range never contacted; `169.251.640..` became `169.251.640`, i.e. 169.251.2.128):
    /// an entry no URL host ever matches, and one the start-up log shows as something else.
    #[test]
    fn an_entry_with_an_empty_label_is_refused() {
        for entry in [
            "14169..",
            "169.251.640..",
            "idp.internal..",
            "a..b",
            ".idp",
            "*.idp..",
        ] {
            let e = entry.parse::<TokenUrlPolicy>().unwrap_err();
            assert!(
                e.to_string().contains("not a valid host name"),
                "{entry}: {e}"
            );
        }
        // Percent-encoded, a wildcard or a colon is still no host name (also found by the
        // fuzz target: `%2A.` became the pattern `*`, shown as an entry that does not parse).
        for entry in [
            "%2A.",
            "%2a.idp",
            "*.%2A",
            "idp%3A8443",
            "169%2c+",
            "a+b.idp",
        ] {
            assert!(entry.parse::<TokenUrlPolicy>().is_err(), "{entry}");
        }
        // One trailing dot is the fully qualified spelling of the same name.
        assert_eq!(policy("idp.internal.").to_string(), "idp.internal");
        assert!(policy("idp.internal.").allows_host("idp.internal"));
    }

    #[test]
    fn bad_allow_list_entries_are_named() {
        for (entry, why) in [
            ("https://idp.internal/token", "is a URL"),
            ("idp.internal:8443", "a port is not part"),
            ("10.0.0.0/33", "not a valid CIDR"),
            ("10.0.0.0/x", "not a valid CIDR"),
            ("idp.internal/token", "not a valid CIDR"),
            ("10.0.0.0/", "not a valid CIDR"),
            ("*", "not a host name"),
            ("*.", "not a valid"),
            ("a.*.b", "not a host name"),
            ("*.*.b", "not a host name"),
            ("a..b", "not a valid host name"),
            ("idp internal", "not a valid host name"),
            ("[10.0.0.1", "not a host name"),
            ("*.10.0.0.1", "not a valid host name"),
            ("metadata.google.internal", "cloud metadata"),
            ("localhost", "loopback"),
            ("127.0.0.1", "never contacted"),
            ("127.0.0.0/8", "never contacted"),
            ("::1", "never contacted"),
            ("169.254.169.254", "never contacted"),
            ("169.254.0.0/16", "never contacted"),
            ("[fe80::1]", "never contacted"),
            ("fe80::/64", "never contacted"),
            ("::ffff:169.254.1.1", "never contacted"),
            ("64:ff9b::a9fe:a9fe", "never contacted"),
            ("224.0.0.0/8", "never contacted"),
        ] {
            let list = format!("idp.example, {entry}");
            let e = list.parse::<TokenUrlPolicy>().unwrap_err().to_string();
            assert!(e.contains(&format!("{entry:?}")), "{e}");
            assert!(e.contains(why), "{entry}: {e}");
        }
        // Broad ranges that merely overlap forbidden ones are fine: those stay forbidden.
        assert!("0.0.0.0/0,::/0,100.64.0.0/10"
            .parse::<TokenUrlPolicy>()
            .is_ok());
    }

    #[test]
    fn address_filtering_is_on_resolved_addresses() {
        let sa = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let f = |addrs: &[&str], loopback: bool| {
            filter_resolved(addrs.iter().map(|a| sa(a)), false, &none(), loopback)
        };
        // Rebinding-style answer mixing public and metadata: only the public one is used.
        let kept = f(
            &["169.254.169.254:0", "93.184.216.34:0", "[fe80::1]:0"],
            false,
        )
        .unwrap();
        assert_eq!(kept, vec![sa("93.184.216.34:0")]);
        // Only forbidden addresses: error.
        assert!(f(&["169.254.169.254:0"], true).is_err());
        assert!(f(&["[fd00:ec2::254]:0"], true).is_err());
        assert!(f(&["100.100.100.200:0"], true).is_err());
        assert!(f(&["0.0.0.0:0", "[::]:0"], true).is_err());
        assert!(f(&["[::ffff:169.254.0.1]:0"], true).is_err());
        // Loopback only with the flag.
        assert!(f(&["127.0.0.1:0", "[::1]:0"], false).is_err());
        assert_eq!(f(&["127.0.0.1:0"], true).unwrap().len(), 1);
        // Private ranges only when allowed; a public address in the same answer is used.
        for private in [
            "10.0.0.5:0",
            "[::ffff:10.0.0.5]:0",
            "100.64.1.1:0",
            "[fd00::5]:0",
        ] {
            let e = f(&[private], true).unwrap_err();
            assert!(e.not_allowed, "{private}");
            assert_eq!(
                f(&[private, "93.184.216.34:0"], false).unwrap(),
                vec![sa("93.184.216.34:0")]
            );
        }
        // Refused private and forbidden together: allow-listing is what would help.
        assert!(
            f(&["10.0.0.5:0", "169.254.169.254:0"], false)
                .unwrap_err()
                .not_allowed
        );
        // Nothing resolved is not a policy error (DNS reports it).
        assert!(f(&[], false).unwrap().is_empty());
    }

    #[test]
    fn extra_private_ranges_put_loopback_under_the_allow_list() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let p = none().with_private_range("127.0.0.0/8");
        assert!(matches!(
            check_ip(lo, false, &p, true),
            Err(Refusal::NotAllowed(_))
        ));
        assert_eq!(check_ip(lo, true, &p, true), Ok(()));
        assert_eq!(check_ip(lo, false, &none(), true), Ok(()));
    }

    #[test]
    fn resolver_name_policy() {
        let refused = |name: &str, allow: bool| check_host_name(name, allow, &none()).is_err();
        assert!(refused("metadata.google.internal", true));
        assert!(refused("METADATA.", true));
        assert!(refused("localhost", false));
        assert!(refused("LocalHost.", false));
        assert_eq!(
            check_host_name("Idp.Example.", false, &none()).unwrap(),
            NameCheck::Lookup {
                host: "idp.example".to_string(),
                allow_listed: false
            }
        );
        let Ok(NameCheck::Local(addrs)) = check_host_name("localhost.", true, &none()) else {
            panic!("localhost is answered locally")
        };
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && addrs.len() == 2);
    }
}

/// The check behind the fuzz target `url_policy`: an allow-list and a token URL from bytes.
#[cfg(any(test, fuzzing))]
pub mod fuzz {
    use super::*;

    /// Bytes up to the first NUL are a `--token-url-allow` value, the rest a token URL. No
    /// panic; an allow-list reads back from its own display; it only ever lifts the private-
    /// range rule; the loopback flag only ever lifts loopback; an accepted URL is https (or
    /// http to loopback with the flag) without userinfo or fragment; no verdict depends on the
    /// URL's password, query or path (so no message can repeat them).
    pub fn check_url_policy(data: &[u8]) {
        let (allow, url) = match data.iter().position(|b| *b == 0) {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (&[][..], data),
        };
        let allow = String::from_utf8_lossy(allow);
        let url = String::from_utf8_lossy(url);
        let policy = match allow.parse::<TokenUrlPolicy>() {
            Ok(p) => {
                let shown = p.to_string();
                let again: TokenUrlPolicy = shown
                    .parse()
                    .unwrap_or_else(|e| panic!("{shown:?} from {allow:?}: {e}"));
                assert_eq!(again, p, "{allow:?} → {shown:?}");
                p
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                TokenUrlPolicy::default()
            }
        };
        // The same URL with another password, query and path: no verdict may depend on them
        // (a message that did could repeat them, and they may hold secrets).
        let variant = Url::parse(&url).ok().map(|u| {
            let mut v = u.clone();
            if v.password().is_some() {
                let _ = v.set_password(Some("other-password"));
            }
            if v.query().is_some() {
                v.set_query(Some("other=query"));
            }
            if !v.cannot_be_a_base() {
                v.set_path("/other/path");
            }
            v.to_string()
        });
        let none = TokenUrlPolicy::default();
        for loopback in [false, true] {
            let strict = validate_token_url(&url, loopback, &none);
            let allowing = validate_token_url(&url, loopback, &policy);
            match (&strict, &allowing) {
                (Err(UrlError::Invalid(a)), Err(UrlError::Invalid(b))) => assert_eq!(a, b),
                (Err(UrlError::Invalid(m)), other) => {
                    panic!("the allow-list lifted {m:?}: {other:?}")
                }
                (Ok(_), Err(e)) => panic!("the allow-list refused {url:?}: {e}"),
                _ => {}
            }
            for u in [&strict, &allowing].into_iter().flatten() {
                assert!(
                    u.scheme() == "https" || (loopback && u.scheme() == "http"),
                    "{url:?}"
                );
                assert!(u.username().is_empty() && u.password().is_none());
                assert!(u.fragment().is_none());
            }
            if let Some(v) = &variant {
                let other = validate_token_url(v, loopback, &policy);
                assert_eq!(
                    allowing.as_ref().err().map(ToString::to_string),
                    other.as_ref().err().map(ToString::to_string),
                    "{url:?} and {v:?}"
                );
            }
            if !loopback && strict.is_ok() {
                assert!(validate_token_url(&url, true, &none).is_ok(), "{url:?}");
            }
        }
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::fuzz::check_url_policy;
    use crate::oauth::token::response::fuzz::{proptest_config, seeds};

    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9-]{1,10}(\\.[a-z0-9-]{1,10}){0,3}\\.?",
            Just("localhost".to_string()),
            Just("METADATA.google.internal.".to_string()),
            (any::<[u8; 4]>()).prop_map(|b| format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3])),
            any::<u32>().prop_map(|n| format!("{n:#x}")),
            any::<u32>().prop_map(|n| n.to_string()),
            any::<[u16; 8]>().prop_map(|s| format!(
                "[{:x}:{:x}:{:x}:{:x}:{:x}:{:x}:{:x}:{:x}]",
                s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]
            )),
            any::<[u8; 4]>().prop_map(|b| format!("[::ffff:{}.{}.{}.{}]", b[0], b[1], b[2], b[3])),
            Just("[::1]".to_string()),
            Just("127.0.0.1".to_string()),
            Just("169.254.169.254".to_string()),
        ]
    }

    fn url() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just("https"), Just("http"), Just("ftp"), Just("HTTPS")],
            proptest::option::of("[a-z]{1,6}(:secretpw[0-9]{3})?@"),
            host(),
            proptest::option::of(0u32..70000),
            "(/[a-z0-9%._-]{0,12}){0,3}",
            proptest::option::of("client_secret=[a-z0-9]{6,10}"),
            proptest::option::of("[a-z]{0,5}"),
        )
            .prop_map(|(scheme, user, host, port, path, query, frag)| {
                let mut u = format!("{scheme}://{}{host}", user.unwrap_or_default());
                if let Some(p) = port {
                    u.push_str(&format!(":{p}"));
                }
                u.push_str(&path);
                if let Some(q) = query {
                    u.push_str(&format!("?{q}"));
                }
                if let Some(f) = frag {
                    u.push_str(&format!("#{f}"));
                }
                u
            })
    }

    fn allow_list() -> impl Strategy<Value = String> {
        let entry = prop_oneof![
            host().prop_map(|h| h.trim_matches(|c| c == '[' || c == ']').to_string()),
            host().prop_map(|h| format!("*.{h}")),
            (any::<[u8; 4]>(), 0u8..=33)
                .prop_map(|(b, l)| format!("{}.{}.{}.{}/{l}", b[0], b[1], b[2], b[3])),
            (any::<[u16; 2]>(), 0u8..=129)
                .prop_map(|(s, l)| format!("{:x}:{:x}::/{l}", s[0], s[1])),
            "\\PC{0,12}",
        ];
        proptest::collection::vec(entry, 0..4).prop_map(|e| e.join(","))
    }

    proptest! {
        #![proptest_config(proptest_config(512))]

        #[test]
        fn fuzz_url_policy(allow in allow_list(), url in prop_oneof![url(), "\\PC{0,40}"]) {
            let mut d = allow.replace('\0', "").into_bytes();
            d.push(0);
            d.extend(url.bytes());
            check_url_policy(&d);
        }
    }

    #[test]
    fn fuzz_seeds_pass_the_checks() {
        for seed in seeds("url_policy") {
            check_url_policy(&seed);
        }
    }
}
