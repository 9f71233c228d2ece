//! Round trips (property tests) and the table of hostile inputs, each with its exact error.

use proptest::prelude::*;

use super::*;

const ID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";

fn refused(field: Field, value: &str, reason: Reason) -> ValidationError {
    ValidationError::new(field, value, reason)
}

fn invalid_char(ch: char, at: usize) -> Reason {
    Reason::InvalidChar { ch, at }
}

const PORT_RANGE: Reason = Reason::OutOfRange { min: 1, max: 65535 };

/// Every hostile input with the exact error expected. Returns how many cases ran.
fn hostile_cases() -> usize {
    let long_label = format!("{}.com", "a".repeat(64));
    let huge_label = "x".repeat(300);
    let domains: Vec<(&str, Reason)> = vec![
        ("", Reason::Empty),
        ("blog.example.com\n", invalid_char('\n', 16)),
        ("a.com\nbackend evil", invalid_char('\n', 5)),
        ("blog example.com", invalid_char(' ', 4)),
        (" blog.example.com", invalid_char(' ', 0)),
        ("blog.example.com#x", invalid_char('#', 16)),
        ("blog\"x\".com", invalid_char('"', 4)),
        ("blog'.com", invalid_char('\'', 4)),
        ("a.com;rm", invalid_char(';', 5)),
        ("a\0.com", invalid_char('\0', 1)),
        ("a\tb.com", invalid_char('\t', 1)),
        ("a\rb.com", invalid_char('\r', 1)),
        ("a\x1bb.com", invalid_char('\x1b', 1)),
        ("bücher.de", invalid_char('ü', 1)),
        ("blog.example.com\u{202e}", invalid_char('\u{202e}', 16)),
        ("a_b.com", invalid_char('_', 1)),
        ("a/b.com", invalid_char('/', 1)),
        ("a.com:80", invalid_char(':', 5)),
        ("{{x}}.com", invalid_char('{', 0)),
        ("$(id).com", invalid_char('$', 0)),
        ("a\\.com", invalid_char('\\', 1)),
        ("a..com", Reason::EmptyLabel { at: 2 }),
        (".example.com", Reason::EmptyLabel { at: 0 }),
        ("example.com.", Reason::EmptyLabel { at: 12 }),
        ("*.", Reason::EmptyLabel { at: 2 }),
        (huge_label.as_str(), Reason::TooLong { len: 300, max: 253 }),
        (long_label.as_str(), Reason::LabelTooLong { at: 0, len: 64 }),
        ("-a.com", Reason::LabelHyphen { at: 0 }),
        ("a.b-.com", Reason::LabelHyphen { at: 2 }),
        ("a.*.com", Reason::MisplacedWildcard),
        ("*a.com", Reason::MisplacedWildcard),
        ("*", Reason::MisplacedWildcard),
        ("10.0.0.1", Reason::NumericTopLabel),
    ];
    for (input, reason) in &domains {
        let expected = refused(Field::Domain, input, reason.clone());
        assert_eq!(Domain::new(input), Err(expected), "domain {input:?}");
    }

    let names: Vec<(&str, Reason)> = vec![
        ("", Reason::Empty),
        ("my sql", invalid_char(' ', 2)),
        ("mysql\n", invalid_char('\n', 5)),
        ("my/sql", invalid_char('/', 2)),
        ("my#sql", invalid_char('#', 2)),
        ("-mysql", Reason::InvalidStart),
        ("..", Reason::InvalidStart),
        ("mÿsql", invalid_char('ÿ', 1)),
    ];
    let long_name = "a".repeat(129);
    for (input, reason) in names
        .iter()
        .cloned()
        .chain([(long_name.as_str(), Reason::TooLong { len: 129, max: 128 })])
    {
        let expected = refused(Field::ServiceName, input, reason);
        assert_eq!(
            ServiceName::new(input),
            Err(expected),
            "service name {input:?}"
        );
    }

    let ports: Vec<(&str, Reason)> = vec![
        ("", Reason::Empty),
        ("0", PORT_RANGE),
        ("65536", PORT_RANGE),
        ("99999999999999999999999", PORT_RANGE),
        ("-1", Reason::NotANumber),
        ("+80", Reason::NotANumber),
        (" 3306", Reason::NotANumber),
        ("3306 ", Reason::NotANumber),
        ("3306\n", Reason::NotANumber),
        ("3306,", Reason::NotANumber),
        ("http", Reason::NotANumber),
        ("0x50", Reason::NotANumber),
        ("3.3", Reason::NotANumber),
        ("٣٣٠٦", Reason::NotANumber),
        ("080", Reason::LeadingZero),
    ];
    for (input, reason) in &ports {
        let expected = refused(Field::ServicePort, input, reason.clone());
        assert_eq!(
            Port::parse(Field::ServicePort, input),
            Err(expected),
            "port {input:?}"
        );
    }

    let upper_id = ID.to_ascii_uppercase();
    let ids: Vec<(&str, Reason)> = vec![
        ("", Reason::Empty),
        (upper_id.as_str(), invalid_char('F', 1)),
        (
            &ID[1..],
            Reason::WrongLength {
                len: 63,
                expected: 64,
            },
        ),
        ("../../etc/passwd", invalid_char('.', 0)),
    ];
    for (input, reason) in &ids {
        let expected = refused(Field::ContainerId, input, reason.clone());
        assert_eq!(
            ContainerId::new(input),
            Err(expected),
            "container id {input:?}"
        );
    }

    let ips: Vec<(&str, Reason)> = vec![
        ("", Reason::Empty),
        ("0.0.0.0", Reason::Unroutable),
        ("::", Reason::Unroutable),
        ("224.0.0.1", Reason::Unroutable),
        ("255.255.255.255", Reason::Unroutable),
        ("010.0.0.1", Reason::NotAnIp),
        ("1.2.3", Reason::NotAnIp),
        ("localhost", Reason::NotAnIp),
        (
            "2001:DB8::1",
            Reason::NotCanonical {
                canonical: "2001:db8::1".to_owned(),
            },
        ),
    ];
    for (input, reason) in &ips {
        let expected = refused(Field::Ip, input, reason.clone());
        assert_eq!(HostIp::parse(input), Err(expected), "ip {input:?}");
    }

    let endpoints: Vec<(&str, ValidationError)> = vec![
        (
            "10.0.0.1",
            refused(Field::Address, "10.0.0.1", Reason::NotAnAddress),
        ),
        (
            "::1:80",
            refused(Field::Address, "::1:80", Reason::NotAnAddress),
        ),
        (
            "[10.0.0.1]:80",
            refused(Field::Address, "[10.0.0.1]:80", Reason::NotAnAddress),
        ),
        ("10.0.0.1:0", refused(Field::Port, "0", PORT_RANGE)),
        (
            "10.0.0.1:80\n",
            refused(Field::Port, "80\n", Reason::NotANumber),
        ),
        (
            "0.0.0.0:80",
            refused(Field::Ip, "0.0.0.0", Reason::Unroutable),
        ),
    ];
    for (input, expected) in &endpoints {
        assert_eq!(
            Endpoint::parse(input),
            Err(expected.clone()),
            "endpoint {input:?}"
        );
    }

    let paths: Vec<(&str, Reason)> = vec![
        ("health", Reason::NotAbsolute),
        ("/health check", invalid_char(' ', 7)),
        ("/h#x", invalid_char('#', 2)),
        ("/h%0aX", invalid_char('%', 2)),
        ("/\"", invalid_char('"', 1)),
    ];
    for (input, reason) in &paths {
        let expected = refused(Field::CheckPath, input, reason.clone());
        assert_eq!(CheckPath::new(input), Err(expected), "check path {input:?}");
    }

    let prefixes: Vec<(&str, Reason)> = vec![
        ("legate", Reason::NotAbsolute),
        ("/legate/", Reason::EmptyLabel { at: 8 }),
        ("/a//b", Reason::EmptyLabel { at: 3 }),
        ("/a/../b", Reason::NotAbsolute),
        ("/a b", invalid_char(' ', 2)),
    ];
    for (input, reason) in &prefixes {
        let expected = refused(Field::Prefix, input, reason.clone());
        assert_eq!(Prefix::new(input), Err(expected), "prefix {input:?}");
    }

    let schema = Schema::default();
    let keys: Vec<(Vec<u8>, KeyError)> = vec![
        (
            format!("/apps/blog.example.com/{ID}").into_bytes(),
            KeyError::Shape {
                kind: KeyKind::App,
                expected: 3,
                found: 2,
            },
        ),
        (
            format!("/services/mysql/3306/{ID}/10.0.0.1:80/x").into_bytes(),
            KeyError::Shape {
                kind: KeyKind::Service,
                expected: 4,
                found: 5,
            },
        ),
        (
            format!("/apps/a b.com/{ID}/10.0.0.1:80").into_bytes(),
            refused(Field::Domain, "a b.com", invalid_char(' ', 1)).into(),
        ),
        (
            format!("/services/mysql/33o6/{ID}/10.0.0.1:80").into_bytes(),
            refused(Field::ServicePort, "33o6", Reason::NotANumber).into(),
        ),
        (
            b"/things/x".to_vec(),
            KeyError::UnknownKind {
                dir: "things".to_owned(),
            },
        ),
        (
            b"apps/a.com".to_vec(),
            KeyError::OutsidePrefix {
                prefix: String::new(),
            },
        ),
        (b"/apps/\xff.com".to_vec(), KeyError::NotUtf8),
        (
            b"/hosts/".to_vec(),
            refused(Field::HostId, "", Reason::Empty).into(),
        ),
    ];
    for (input, expected) in &keys {
        assert_eq!(schema.parse(input), Err(expected.clone()), "key {input:?}");
    }
    let prefixed = Schema::new(Prefix::new("/legate").unwrap());
    let outside = format!("/other/apps/a.com/{ID}/10.0.0.1:80");
    assert_eq!(
        prefixed.parse(outside.as_bytes()),
        Err(KeyError::OutsidePrefix {
            prefix: "/legate".to_owned()
        })
    );

    let endpoint = Endpoint::parse("10.0.0.1:80").unwrap();
    let values: Vec<(Vec<u8>, ValueError)> = vec![
        (
            br#"{"weight": 300}"#.to_vec(),
            refused(
                Field::Weight,
                "300",
                Reason::OutOfRange { min: 0, max: 256 },
            )
            .into(),
        ),
        (
            br#"{"weight": "100"}"#.to_vec(),
            refused(
                Field::Weight,
                "\"100\"",
                Reason::WrongType {
                    expected: "non-negative integer",
                },
            )
            .into(),
        ),
        (
            br#"{"host_id": "a\nb"}"#.to_vec(),
            refused(Field::HostId, "a\nb", invalid_char('\n', 1)).into(),
        ),
        (
            br#"{"check_path": "/x\ninjected"}"#.to_vec(),
            refused(Field::CheckPath, "/x\ninjected", invalid_char('\n', 2)).into(),
        ),
        (
            br#"{"check": "/x;y"}"#.to_vec(),
            refused(Field::CheckPath, "/x;y", invalid_char(';', 2)).into(),
        ),
        (
            br#"{"check": "http"}"#.to_vec(),
            refused(Field::Check, "http", Reason::NotACheck).into(),
        ),
        (
            br#"{"check": "tcp", "check_path": "/x"}"#.to_vec(),
            ValueError::Json("both 'check' and 'check_path' are set".to_owned()),
        ),
        (b"garbage".to_vec(), ValueError::Unrecognized),
        (b"[1,2]".to_vec(), ValueError::Unrecognized),
        (
            b"10.0.0.2:80".to_vec(),
            ValueError::AddressMismatch {
                value: "10.0.0.2:80".to_owned(),
                key: "10.0.0.1:80".to_owned(),
            },
        ),
        (vec![b' '; 5000], ValueError::TooLarge { len: 5000 }),
        (b"{\xff}".to_vec(), ValueError::NotUtf8),
    ];
    for (input, expected) in &values {
        assert_eq!(
            RegistrationValue::parse(input, &endpoint),
            Err(expected.clone()),
            "value {:?}",
            String::from_utf8_lossy(input)
        );
    }
    assert!(matches!(
        RegistrationValue::parse(b"{\"weight\": 1", &endpoint),
        Err(ValueError::Json(_))
    ));
    assert_eq!(
        HostRecord::parse(br#"{"ip": "10.0.0.1", "version": "1"}"#),
        Err(ValueError::Missing("instance"))
    );

    domains.len()
        + names.len()
        + 1
        + ports.len()
        + ids.len()
        + ips.len()
        + endpoints.len()
        + paths.len()
        + prefixes.len()
        + keys.len()
        + 1
        + values.len()
        + 2
}

#[test]
fn hostile_inputs_are_refused_with_exact_errors() {
    let cases = hostile_cases();
    assert!(cases >= 40, "only {cases} hostile cases");
}

#[test]
fn errors_name_the_field_and_escape_the_value() {
    let err = Domain::new("a b\n.com").unwrap_err();
    assert_eq!(
        err.to_string(),
        "domain 'a b\\n.com': character ' ' at byte 1 is not allowed"
    );
    let err = Port::parse(Field::ServicePort, "70000").unwrap_err();
    assert_eq!(
        err.to_string(),
        "service port '70000': is out of range 1-65535"
    );
    let long = "x".repeat(300);
    let shown = Domain::new(&long).unwrap_err().to_string();
    assert!(
        shown.len() < 200,
        "a long value is shortened in messages: {shown}"
    );
}

#[test]
fn domains_are_lower_cased_and_wildcards_recognised() {
    let domain = Domain::new("Blog.Example.COM").unwrap();
    assert_eq!(domain.as_str(), "blog.example.com");
    assert!(!domain.is_wildcard());
    assert!(Domain::new("*.example.com").unwrap().is_wildcard());
    assert_eq!(Domain::new("localhost").unwrap().as_str(), "localhost");
    assert_eq!(Domain::new("x1.123a").unwrap().as_str(), "x1.123a");
}

#[test]
fn seed_keys_and_values_are_read() {
    let schema = Schema::default();
    let app = format!("/apps/blog.domain.com/{ID}/172.17.42.1:49153");
    let Key::App(key) = schema.parse(app.as_bytes()).unwrap() else {
        panic!("not an app key");
    };
    assert_eq!(key.domain.as_str(), "blog.domain.com");
    assert_eq!(key.endpoint.to_string(), "172.17.42.1:49153");
    // The seed's tools wrote `ip:port`, or nothing, as the value.
    let seed = RegistrationValue::parse(b"172.17.42.1:49153", &key.endpoint).unwrap();
    assert_eq!(seed, RegistrationValue::default());
    assert_eq!(
        RegistrationValue::parse(b"", &key.endpoint).unwrap(),
        RegistrationValue::default()
    );

    let service = format!("/services/some-mysql/3306/{ID}/[2001:db8::5]:32768");
    let Key::Service(key) = schema.parse(service.as_bytes()).unwrap() else {
        panic!("not a service key");
    };
    assert_eq!(key.name.as_str(), "some-mysql");
    assert_eq!(key.service_port.get(), 3306);
    assert_eq!(schema.format(&Key::Service(key)), service);
}

#[test]
fn unknown_value_fields_are_ignored() {
    let endpoint = Endpoint::parse("10.0.0.1:80").unwrap();
    let value = RegistrationValue::parse(br#"{"weight": 5, "zone": "b"}"#, &endpoint).unwrap();
    assert_eq!(value.weight, Some(Weight::new(5).unwrap()));
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
}

fn domain() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        prop::collection::vec(label(), 0..4),
        "[a-z]([a-z0-9-]{0,10}[a-z0-9])?",
    )
        .prop_map(|(wildcard, labels, top)| {
            let mut parts = labels;
            parts.push(top);
            let name = parts.join(".");
            if wildcard { format!("*.{name}") } else { name }
        })
}

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9_.-]{0,40}"
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (any::<std::net::IpAddr>(), 1..=u16::MAX).prop_filter_map("host address", |(ip, port)| {
        Some(Endpoint {
            ip: HostIp::new(ip).ok()?,
            port: Port::new(Field::Port, port).ok()?,
        })
    })
}

fn prefix() -> impl Strategy<Value = Prefix> {
    prop_oneof![
        Just(Prefix::default()),
        prop::collection::vec("[a-z0-9_-][a-z0-9._-]{0,8}", 1..3)
            .prop_map(|segments| Prefix::new(&format!("/{}", segments.join("/"))).unwrap()),
    ]
}

fn container_id() -> impl Strategy<Value = ContainerId> {
    "[0-9a-f]{64}".prop_map(|s| ContainerId::new(&s).unwrap())
}

fn key() -> impl Strategy<Value = Key> {
    prop_oneof![
        (domain(), container_id(), endpoint()).prop_map(|(d, container_id, endpoint)| {
            Key::App(AppKey {
                domain: Domain::new(&d).unwrap(),
                container_id,
                endpoint,
            })
        }),
        (name(), 1..=u16::MAX, container_id(), endpoint()).prop_map(
            |(n, port, container_id, endpoint)| {
                Key::Service(ServiceKey {
                    name: ServiceName::new(&n).unwrap(),
                    service_port: Port::new(Field::ServicePort, port).unwrap(),
                    container_id,
                    endpoint,
                })
            }
        ),
        name().prop_map(|n| Key::Host(HostKey {
            host_id: HostId::new(&n).unwrap()
        })),
        (name(), container_id()).prop_map(|(n, container_id)| Key::Refused(RefusedKey {
            host_id: HostId::new(&n).unwrap(),
            container_id,
        })),
    ]
}

proptest! {
    #[test]
    fn valid_domains_are_accepted_unchanged(d in domain()) {
        prop_assert_eq!(Domain::new(&d).unwrap().to_string(), d.clone());
        prop_assert_eq!(Domain::new(&d.to_ascii_uppercase()).unwrap().to_string(), d);
    }

    #[test]
    fn keys_round_trip(prefix in prefix(), key in key()) {
        let schema = Schema::new(prefix);
        let text = schema.format(&key);
        prop_assert_eq!(schema.parse(text.as_bytes()), Ok(key));
    }

    #[test]
    fn values_round_trip(
        host in proptest::option::of(name()),
        container in proptest::option::of(name()),
        weight in proptest::option::of(0..=256u64),
        path in proptest::option::of("tcp|/[a-z0-9/._~?=&:@+,-]{0,30}"),
        endpoint in endpoint(),
    ) {
        let value = RegistrationValue {
            host_id: host.map(|h| HostId::new(&h).unwrap()),
            container_name: container.map(|c| ContainerName::new(&c).unwrap()),
            weight: weight.map(|w| Weight::new(w).unwrap()),
            check: path.map(|p| HealthCheck::parse(&p).unwrap()),
        };
        let json = value.to_json();
        prop_assert_eq!(RegistrationValue::parse(json.as_bytes(), &endpoint), Ok(value));
    }

    #[test]
    fn host_records_round_trip(endpoint in endpoint(), instance in name(), version in name()) {
        let record = HostRecord::new(endpoint.ip, &instance, &version).unwrap();
        prop_assert_eq!(HostRecord::parse(record.to_json().as_bytes()), Ok(record));
    }

    /// Whatever is accepted, from any input, can be rendered into HAProxy's configuration.
    #[test]
    fn anything_accepted_is_safe_text(raw in prop::collection::vec(any::<u8>(), 0..120), s in ".{0,80}") {
        for text in [String::from_utf8_lossy(&raw).into_owned(), s] {
            if let Ok(d) = Domain::new(&text) {
                prop_assert!(d.as_str().chars().all(is_safe_char));
            }
            if let Ok(n) = ServiceName::new(&text) {
                prop_assert!(n.as_str().chars().all(is_safe_char));
            }
            if let Ok(p) = CheckPath::new(&text) {
                prop_assert!(p.as_str().chars().all(is_safe_char));
            }
            if let Ok(key) = Schema::default().parse(text.as_bytes()) {
                let formatted = Schema::default().format(&key);
                prop_assert!(formatted.chars().all(is_safe_char));
            }
        }
    }
}

#[test]
fn a_refusal_is_one_printable_bounded_line_both_ways() {
    let name = ContainerName::new("web-1").ok();
    let hostile = format!(
        "DOMAIN_NAME 'a\u{1b}[31mb\nbackend x': {}",
        "y".repeat(2000)
    );
    let refusal = Refusal::new(name.clone(), &hostile);
    assert!(!refusal.reason.contains(char::is_control), "{refusal:?}");
    assert!(refusal.reason.len() <= Refusal::MAX_REASON && refusal.reason.ends_with("..."));
    let parsed = Refusal::parse(refusal.to_json().as_bytes()).unwrap();
    assert_eq!(parsed, refusal);
    // What another writer put there is made printable on the way in too.
    let raw = br#"{"container_name":"web-1","reason":"a\u001b[2Jb"}"#;
    let parsed = Refusal::parse(raw).unwrap();
    assert_eq!(
        (parsed.container_name, parsed.reason.as_str()),
        (name, "a [2Jb")
    );
    assert_eq!(Refusal::parse(b"{}"), Err(ValueError::Missing("reason")));
    assert!(Refusal::parse(br#"{"reason": 3}"#).is_err());
}
