//! Unit tests of the pure core: registry parsing, model building, rendering, `--wait`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use legate_proto::registry::{Prefix, Schema};
use legate_proto::v1;

use crate::model::{self, DEFAULT_HEADROOM, HOSTS_MAP, Registry, Routes, Slots, WILDCARDS_MAP};
use crate::render::{ChunkKey, DEFAULT_TEMPLATE, Item, RenderError, Renderer, Settings, View};
use crate::{BindAddresses, Wait, parse_wait};

fn id(n: u32) -> String {
    format!("{:08x}{n:056x}", n.wrapping_mul(2_654_435_761))
}

fn registry(prefix: &str) -> Registry {
    Registry::new(Schema::new(Prefix::new(prefix).unwrap()))
}

fn settings() -> Settings {
    Settings {
        binds: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
        http_port: 8080,
        generator: "confgen@test".to_owned(),
        allowed_file_dirs: Vec::new(),
    }
}

fn app(domain: &str, n: u32, endpoint: &str) -> Vec<u8> {
    format!("/apps/{domain}/{}/{endpoint}", id(n)).into_bytes()
}

fn service(name: &str, port: u16, n: u32, endpoint: &str) -> Vec<u8> {
    format!("/services/{name}/{port}/{}/{endpoint}", id(n)).into_bytes()
}

const VALUE: &[u8] = br#"{"host_id":"host-a","container_name":"web-1"}"#;

#[test]
fn keys_parse_with_json_seed_and_empty_values() {
    let mut registry = registry("");
    let kvs = vec![
        (app("blog.example.com", 1, "10.0.0.1:32768"), VALUE.to_vec()),
        (
            app("blog.example.com", 2, "10.0.0.2:32769"),
            b"10.0.0.2:32769".to_vec(),
        ),
        (app("blog.example.com", 3, "10.0.0.3:32770"), Vec::new()),
        (service("mysql", 3306, 4, "10.0.0.1:32771"), VALUE.to_vec()),
        (
            b"/hosts/host-a".to_vec(),
            br#"{"ip":"10.0.0.1","instance":"abc","version":"0.1.0"}"#.to_vec(),
        ),
    ];
    assert!(registry.reset(kvs, 42).is_empty());
    let model = registry.model(&[]);
    assert_eq!(model.etcd_revision, 42);
    assert!(model.skipped.is_empty(), "{:?}", model.skipped);
    assert_eq!(model.apps.len(), 1);
    let servers = &model.apps[0].servers;
    assert_eq!(servers.len(), 3);
    assert_eq!(servers[0].host_id, "host-a");
    assert_eq!(servers[0].container_name, "web-1");
    assert_eq!(servers[0].weight, 100);
    assert_eq!(servers[0].address, "10.0.0.1:32768");
    assert_eq!(servers[0].name, format!("{}-10.0.0.1-32768", &id(1)[..12]));
    assert_eq!(servers[1].host_id, "", "seed value carries no host id");
    assert_eq!(model.services.len(), 1);
    assert_eq!(model.services[0].backend, "svc_3306");
    assert_eq!(model.services[0].names, ["mysql"]);
    assert_eq!(model.hosts.len(), 1);
    assert_eq!(model.hosts[0].ip, "10.0.0.1");
}

#[test]
fn bad_keys_and_values_are_skipped_with_reasons_and_the_rest_renders() {
    let mut registry = registry("/legate");
    let good = b"/legate/apps/ok.example.com/".to_vec();
    let good = [good, format!("{}/10.0.0.1:80", id(1)).into_bytes()].concat();
    let kvs = vec![
        (good.clone(), VALUE.to_vec()),
        (
            format!("/legate/apps/a.com\nbackend evil/{}/10.0.0.1:80", id(2)).into_bytes(),
            Vec::new(),
        ),
        (
            format!("/legate/apps/x.example.com/{}/10.0.0.1:http", id(3)).into_bytes(),
            Vec::new(),
        ),
        (
            format!("/legate/apps/y.example.com/{}/10.0.0.1:80", id(4)).into_bytes(),
            b"{not json".to_vec(),
        ),
        (
            format!("/legate/apps/z.example.com/{}/10.0.0.1:80", id(5)).into_bytes(),
            b"10.0.0.9:80".to_vec(),
        ),
        (b"/legate/apps/\xff/x/y".to_vec(), Vec::new()),
        (b"/legate/services/db/3306".to_vec(), Vec::new()),
        (b"/legate/hosts/h".to_vec(), b"{}".to_vec()),
        // Not a registry directory: ignored, not skipped.
        (b"/legate/bogus/x".to_vec(), Vec::new()),
        (b"/other/apps/a.com/x/y".to_vec(), Vec::new()),
    ];
    let notices = registry.reset(kvs, 7);
    assert_eq!(notices.len(), 7, "{notices:#?}");
    assert!(
        notices.iter().all(|n| !n.key.contains('\n')),
        "keys are escaped"
    );
    let model = registry.model(&[]);
    assert_eq!(model.skipped.len(), 7);
    let reasons: Vec<&str> = model.skipped.iter().map(|s| s.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("key: domain")),
        "{reasons:#?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not valid UTF-8")),
        "{reasons:#?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("value:")),
        "{reasons:#?}"
    );
    assert_eq!(model.apps.len(), 1);
    assert_eq!(model.apps[0].domain, "ok.example.com");
    let rendered = Renderer::new(DEFAULT_TEMPLATE)
        .unwrap()
        .render(&View::of_model(&model), &settings())
        .unwrap();
    assert!(!rendered.config.contains("evil"));
    assert!(rendered.config.contains("backend app_ok.example.com"));

    // The same listing again announces nothing new; a changed reason is announced.
    let again = vec![(b"/legate/hosts/h".to_vec(), b"{}".to_vec())];
    assert!(registry.clone().reset(again, 8).is_empty());
    let changed = vec![(b"/legate/hosts/h".to_vec(), b"[]".to_vec())];
    assert_eq!(registry.reset(changed, 9).len(), 1);
}

#[test]
fn puts_and_deletes_follow_the_revision() {
    let mut registry = registry("");
    registry.reset(Vec::new(), 10);
    let key = app("a.example.com", 1, "10.0.0.1:80");
    assert!(registry.put(key.clone(), b"", 11).is_none());
    assert_eq!(registry.model(&[]).apps.len(), 1);
    assert!(registry.put(key.clone(), b"{bad", 12).is_some());
    let model = registry.model(&[]);
    assert!(
        model.apps.is_empty(),
        "a bad new value replaces the good one"
    );
    assert_eq!(model.skipped.len(), 1);
    registry.delete(&key, 13);
    let model = registry.model(&[]);
    assert!(model.skipped.is_empty() && model.apps.is_empty());
    assert_eq!(model.etcd_revision, 13);
    // A put outside the registry still advances the revision (it is in the watched range).
    assert!(registry.put(b"/b/x".to_vec(), b"", 14).is_none());
    assert_eq!(registry.revision(), 14);
    assert!(registry.is_empty());
}

#[test]
fn a_domain_written_in_capitals_is_the_app_of_its_lower_case_name() {
    let mut registry = registry("");
    let mut routes = Routes::new(Vec::new(), DEFAULT_HEADROOM);
    registry.reset(
        vec![(app("a.example.com", 1, "10.0.0.1:80"), Vec::new())],
        2,
    );
    let upper = app("A.Example.COM", 2, "10.0.0.2:80");
    registry.put(upper.clone(), VALUE, 3);
    routes.update(&mut registry);
    let servers = |routes: &Routes| {
        let app = &routes.apps["a.example.com"];
        app.servers.iter().map(|s| s.ip.clone()).collect::<Vec<_>>()
    };
    assert_eq!(servers(&routes), ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(routes.apps.len(), 1);
    registry.delete(&upper, 4);
    routes.update(&mut registry);
    assert_eq!(servers(&routes), ["10.0.0.1"]);
}

#[test]
fn refusals_are_kept_for_the_status_and_never_routed() {
    let mut registry = registry("/legate");
    let refused = format!("/legate/refused/host-a/{}", id(7)).into_bytes();
    let value = br#"{"container_name":"web-7","reason":"DOMAIN_NAME 'a b': character ' '"}"#;
    registry.reset(vec![(refused.clone(), value.to_vec())], 5);
    let model = registry.model(&[]);
    assert!(model.apps.is_empty() && model.services.is_empty() && model.skipped.is_empty());
    assert_eq!(
        registry.refusals(),
        [v1::HostRefusal {
            host_id: "host-a".to_owned(),
            container_id: id(7),
            container_name: "web-7".to_owned(),
            reason: "DOMAIN_NAME 'a b': character ' '".to_owned(),
        }]
    );
    // A value that does not parse is a skipped key like any other, not a refusal.
    assert!(registry.put(refused.clone(), b"{}", 6).is_some());
    assert!(registry.refusals().is_empty());
    assert_eq!(registry.model(&[]).skipped.len(), 1);
    registry.delete(&refused, 7);
    assert!(registry.is_empty());
}

#[test]
fn same_registry_in_any_order_renders_byte_identical_output() {
    let kvs = vec![
        (app("b.example.com", 1, "10.0.0.10:80"), VALUE.to_vec()),
        (app("b.example.com", 2, "10.0.0.9:80"), VALUE.to_vec()),
        (app("a.example.com", 3, "[2001:db8::1]:80"), VALUE.to_vec()),
        (app("*.example.com", 4, "10.0.0.1:81"), VALUE.to_vec()),
        (service("db", 3306, 5, "10.0.0.1:3306"), VALUE.to_vec()),
        (service("cache", 6379, 6, "10.0.0.2:6379"), VALUE.to_vec()),
    ];
    let mut renderer = Renderer::new(DEFAULT_TEMPLATE).unwrap();
    let mut forward = registry("");
    forward.reset(kvs.clone(), 5);
    let mut backward = registry("");
    backward.reset(Vec::new(), 1);
    for (key, value) in kvs.into_iter().rev() {
        backward.put(key, &value, 5);
    }
    let a = renderer
        .render(&View::of_model(&forward.model(&[])), &settings())
        .unwrap();
    let b = renderer
        .render(&View::of_model(&backward.model(&[])), &settings())
        .unwrap();
    assert_eq!(a, b);
    // Servers are ordered by address, numerically.
    let model = forward.model(&[]);
    let b_app = model
        .apps
        .iter()
        .find(|a| a.domain == "b.example.com")
        .unwrap();
    let ips: Vec<&str> = b_app.servers.iter().map(|s| s.ip.as_str()).collect();
    assert_eq!(ips, ["10.0.0.9", "10.0.0.10"]);
    // Services by port.
    let ports: Vec<u32> = model.services.iter().map(|s| s.port).collect();
    assert_eq!(ports, [3306, 6379]);
}

#[test]
fn shared_service_ports_share_one_listener_and_reserved_ports_are_skipped() {
    let mut registry = registry("");
    registry.reset(
        vec![
            (service("mysql", 3306, 1, "10.0.0.1:3306"), Vec::new()),
            (service("mariadb", 3306, 2, "10.0.0.2:3306"), Vec::new()),
            // One container under two names: one server.
            (
                service("mariadb-alias", 3306, 2, "10.0.0.2:3306"),
                Vec::new(),
            ),
            (service("web", 8080, 3, "10.0.0.3:8080"), Vec::new()),
        ],
        3,
    );
    let model = registry.model(&[8080]);
    assert_eq!(model.services.len(), 1);
    let shared = &model.services[0];
    assert_eq!(shared.names, ["mariadb", "mariadb-alias", "mysql"]);
    assert_eq!(shared.servers.len(), 2);
    assert_eq!(model::shared_ports(&model.services).len(), 1);
    assert_eq!(model.skipped.len(), 1);
    assert!(
        model.skipped[0].reason.contains("8080"),
        "{:?}",
        model.skipped
    );
}

#[test]
fn server_names_are_unique_within_a_backend() {
    let mut registry = registry("");
    // Two ids sharing their first 12 digits at one endpoint: only hand-written keys do this.
    let a = format!("{}{}", "a".repeat(12), "0".repeat(52));
    let b = format!("{}{}", "a".repeat(12), "1".repeat(52));
    registry.reset(
        vec![
            (
                format!("/apps/x.com/{a}/10.0.0.1:80").into_bytes(),
                Vec::new(),
            ),
            (
                format!("/apps/x.com/{b}/10.0.0.1:80").into_bytes(),
                Vec::new(),
            ),
        ],
        1,
    );
    let model = registry.model(&[]);
    let names: Vec<&str> = model.apps[0]
        .servers
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["aaaaaaaaaaaa-10.0.0.1-80", "aaaaaaaaaaaa-10.0.0.1-80-2"]
    );
}

#[test]
fn maps_route_exact_names_and_wildcards_longest_suffix_first() {
    let mut registry = registry("");
    registry.reset(
        vec![
            (app("*.example.com", 1, "10.0.0.1:80"), Vec::new()),
            (app("*.eu.example.com", 2, "10.0.0.1:81"), Vec::new()),
            (app("www.example.com", 3, "10.0.0.1:82"), Vec::new()),
        ],
        1,
    );
    let maps = model::maps(&registry.model(&[]));
    assert_eq!(maps[0].name, HOSTS_MAP);
    assert_eq!(maps[0].content, "www.example.com app_www.example.com\n");
    assert_eq!(maps[1].name, WILDCARDS_MAP);
    assert_eq!(
        maps[1].content,
        ".eu.example.com wild_eu.example.com\n.example.com wild_example.com\n"
    );
}

#[test]
fn default_template_renders_checks_only_when_asked_listeners_and_no_global() {
    let mut registry = registry("");
    let check = br#"{"check_path":"/healthz","weight":5}"#;
    registry.reset(
        vec![
            (app("blog.example.com", 1, "10.0.0.1:80"), check.to_vec()),
            (service("db", 3306, 2, "[2001:db8::2]:3306"), Vec::new()),
            (
                service("db", 3306, 3, "10.0.0.3:3306"),
                br#"{"check":"tcp"}"#.to_vec(),
            ),
        ],
        1,
    );
    let mut settings = settings();
    settings.binds = vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)];
    let rendered = Renderer::new(DEFAULT_TEMPLATE)
        .unwrap()
        .render(&View::of_model(&registry.model(&[])), &settings)
        .unwrap();
    let config = &rendered.config;
    for line in [
        "    bind [::]:8080",
        "    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host blog.example.com",
        &format!(
            "    server {}-10.0.0.1-80 10.0.0.1:80 weight 5 check",
            &id(1)[..12]
        ),
        "listen svc_3306",
        "    bind [::]:3306",
        &format!(
            "    server {}-2001:db8::2-3306 [2001:db8::2]:3306 weight 100",
            &id(2)[..12]
        ),
        &format!(
            "    server {}-10.0.0.3-3306 10.0.0.3:3306 weight 100 check",
            &id(3)[..12]
        ),
        "    default_backend legate_no_route",
    ] {
        assert!(
            config.lines().any(|l| l == line),
            "no line {line:?} in:\n{config}"
        );
    }
    assert!(!config.lines().any(|l| l.starts_with("global")));
}

#[test]
fn haproxy_listens_on_every_bind_address_and_auto_starts_with_loopback() {
    let mut registry = registry("");
    registry.reset(
        vec![(service("db", 3306, 1, "10.0.0.2:3306"), Vec::new())],
        1,
    );
    let mut settings = settings();
    settings.binds = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(Ipv4Addr::new(172, 17, 0, 1)),
    ];
    let rendered = Renderer::new(DEFAULT_TEMPLATE)
        .unwrap()
        .render(&View::of_model(&registry.model(&[])), &settings)
        .unwrap();
    let binds: Vec<&str> = rendered
        .config
        .lines()
        .filter(|l| l.trim_start().starts_with("bind "))
        .collect();
    assert_eq!(
        binds,
        [
            "    bind 127.0.0.1:8080,172.17.0.1:8080",
            "    bind 127.0.0.1:3306",
            "    bind 172.17.0.1:3306",
        ]
    );

    assert_eq!(BindAddresses::parse("auto").unwrap(), BindAddresses::Auto);
    let auto = BindAddresses::Auto.resolve();
    assert_eq!(auto[0], IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert!(auto.len() <= 2 && auto.iter().all(|ip| !ip.is_unspecified()));
    assert_eq!(
        BindAddresses::parse("127.0.0.1,::1").unwrap(),
        BindAddresses::List(vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()])
    );
    for bad in [
        "",
        "localhost",
        "0.0.0.0,127.0.0.1",
        "127.0.0.1,127.0.0.1",
        "auto,::1",
    ] {
        assert!(BindAddresses::parse(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn templates_are_strict_unescaped_and_may_not_ask_what_no_configuration_may() {
    let model = registry("").model(&[]);
    let mut settings = settings();
    settings.generator = "a&b<c>\"".to_owned();
    let mut raw = Renderer::new("# {{generator}}\n").unwrap();
    assert_eq!(
        raw.render(&View::of_model(&model), &settings)
            .unwrap()
            .config,
        "# a&b<c>\"\n"
    );

    let mut strict = Renderer::new("{{no_such_field}}").unwrap();
    assert!(matches!(
        strict.render(&View::of_model(&model), &settings),
        Err(RenderError::Render(_))
    ));
    assert!(matches!(
        Renderer::new("{{#each apps}}"),
        Err(RenderError::Template(_))
    ));
    let mut global = Renderer::new("defaults\nglobal\n    maxconn 1\n").unwrap();
    assert!(matches!(
        global.render(&View::of_model(&model), &settings),
        Err(RenderError::Policy(legate_proto::policy::Violation {
            line: 2,
            ..
        }))
    ));
    // Whatever the quoting, and whatever reaches a file or runs code.
    for template in [
        "defaults\n'prog'ram x\n    command id\n",
        "backend b\n    errorfile 503 /etc/shadow\n",
        "backend b\n    server s /var/run/docker.sock\n",
    ] {
        let mut renderer = Renderer::new(template).unwrap();
        let rendered = renderer.render(&View::of_model(&model), &settings);
        assert!(
            matches!(&rendered, Err(RenderError::Policy(v)) if v.line == 2),
            "{template}: {rendered:?}"
        );
    }
}

#[test]
fn apps_and_services_stream_through_block_helpers() {
    let mut registry = registry("");
    registry.reset(
        vec![
            (app("a.example.com", 1, "10.0.0.1:80"), Vec::new()),
            (app("b.example.com", 2, "10.0.0.2:80"), Vec::new()),
            (service("db", 3306, 3, "10.0.0.3:3306"), Vec::new()),
        ],
        1,
    );
    let model = View::of_model(&registry.model(&[]));
    let mut renderer = Renderer::new(
        "{{app_count}} {{service_count}}|{{#apps}}{{@index}}{{#if @first}}F{{/if}}{{#if @last}}L{{/if}}:{{domain}}@{{@root.http_bind}}={{#each servers}}{{address}}{{/each}};{{/apps}}|{{#services}}{{port}}{{names.[0]}}{{/services}}",
    )
    .unwrap();
    assert_eq!(
        renderer.render(&model, &settings()).unwrap().config,
        "2 1|0F:a.example.com@0.0.0.0:8080=10.0.0.1:80;1L:b.example.com@0.0.0.0:8080=10.0.0.2:80;|3306db"
    );
    // `apps` is a helper, not a list: `#each apps` fails (strict mode) with a clear error.
    let mut each = Renderer::new("{{#each apps}}{{/each}}").unwrap();
    assert!(matches!(
        each.render(&model, &settings()),
        Err(RenderError::Render(_))
    ));
}

#[test]
fn an_item_that_fails_its_block_is_named_and_the_rest_renders_without_it() {
    let mut registry = registry("");
    registry.reset(
        vec![
            (app("a.example.com", 1, "10.0.0.1:80"), Vec::new()),
            (
                app("b.example.com", 2, "10.0.0.2:80"),
                br#"{"check_path":"/health"}"#.to_vec(),
            ),
            (app("c.example.com", 3, "10.0.0.3:80"), Vec::new()),
            (service("db", 3306, 4, "10.0.0.4:3306"), Vec::new()),
        ],
        1,
    );
    let mut model = registry.model(&[]);
    Slots::default().assign(&mut model);
    let model = View::of_model(&model);
    // Nested blocks inside the failing one: what they leave pushed must not disturb the rest.
    let template = "{{#apps}}{{#each servers}}{{#if ../check_path}}{{no_such_field}}{{/if}}{{/each}}{{domain}};{{/apps}}|{{#slots}}{{#unless free}}{{#if domain}}{{#each servers}}{{address}}{{/each}}{{/if}}{{/unless}}{{/slots}}|{{#services}}{{nope}}{{/services}}";
    let mut renderer = Renderer::new(template).unwrap();
    let Err(RenderError::Items(failures)) = renderer.render(&model, &settings()) else {
        panic!("the failing items are named");
    };
    let failed: Vec<(Item, bool)> = failures
        .iter()
        .map(|f| {
            (
                f.item.clone(),
                f.error.contains("no_such_field") || f.error.contains("nope"),
            )
        })
        .collect();
    assert_eq!(
        failed,
        [
            (Item::App("b.example.com".to_owned()), true),
            (Item::Service(3306), true)
        ]
    );
    // A template whose failure is no item's (a free slot, the root) fails the render.
    let mut slots = Renderer::new("{{#slots}}{{#if free}}{{nope}}{{/if}}{{/slots}}").unwrap();
    assert!(matches!(
        slots.render(&model, &settings()),
        Err(RenderError::Render(_))
    ));
}

/// The slot of each app of `registry`'s model after `slots` assigned them, by domain.
fn slots_of(registry: &Registry, slots: &mut Slots) -> (Vec<(String, u32, String)>, u32) {
    let mut model = registry.model(&[]);
    slots.assign(&mut model);
    let apps = model
        .apps
        .into_iter()
        .map(|a| (a.domain, a.slot, a.backend))
        .collect();
    (apps, model.slots)
}

fn plain(domain: &str, slot: u32) -> (String, u32, String) {
    (domain.to_owned(), slot, format!("slot_{slot}"))
}

#[test]
fn plain_apps_keep_their_pooled_backend_and_new_ones_take_free_slots() {
    let mut registry = registry("");
    registry.reset(
        vec![
            (app("b.example.com", 1, "10.0.0.1:80"), Vec::new()),
            (app("a.example.com", 2, "10.0.0.2:80"), Vec::new()),
            (app("*.example.com", 3, "10.0.0.3:80"), Vec::new()),
            (
                app("checked.example.com", 4, "10.0.0.4:80"),
                br#"{"check_path":"/health"}"#.to_vec(),
            ),
        ],
        1,
    );
    let mut slots = Slots::default();
    // A fresh pool numbers plain apps in domain order; wildcards and checked apps keep a
    // backend of their own.
    let (apps, total) = slots_of(&registry, &mut slots);
    assert_eq!(
        apps,
        [
            ("*.example.com".to_owned(), 0, "wild_example.com".to_owned()),
            plain("a.example.com", 1),
            plain("b.example.com", 2),
            (
                "checked.example.com".to_owned(),
                0,
                "app_checked.example.com".to_owned()
            ),
        ]
    );
    assert_eq!(total, 64);
    // a leaves, then c (before b in domain order) arrives: b keeps 2, c takes the freed 1.
    registry.delete(&app("a.example.com", 2, "10.0.0.2:80"), 2);
    registry.put(app("c.example.com", 5, "10.0.0.5:80"), b"", 3);
    registry.put(app("0.example.com", 6, "10.0.0.6:80"), b"", 4);
    let (apps, total) = slots_of(&registry, &mut slots);
    let pooled: Vec<_> = apps.into_iter().filter(|a| a.1 > 0).collect();
    assert_eq!(
        pooled,
        [
            plain("0.example.com", 1),
            plain("b.example.com", 2),
            plain("c.example.com", 3)
        ]
    );
    assert_eq!(total, 64, "the pool does not change while slots are free");
    // The same registry in a fresh pool: numbered in domain order again.
    let (fresh, _) = slots_of(&registry, &mut Slots::default());
    assert_eq!(
        fresh.into_iter().filter(|a| a.1 > 0).collect::<Vec<_>>(),
        [
            plain("0.example.com", 1),
            plain("b.example.com", 2),
            plain("c.example.com", 3)
        ]
    );
}

#[test]
fn the_pool_grows_when_full_and_is_compacted_when_far_too_large() {
    let mut registry = registry("");
    let mut slots = Slots::default();
    let put = |registry: &mut Registry, range: std::ops::Range<u32>| {
        for n in range {
            let domain = format!("app{n:04}.example.com");
            registry.put(app(&domain, n, "10.0.0.1:80"), b"", i64::from(n) + 1);
        }
    };
    put(&mut registry, 0..64);
    let (_, total) = slots_of(&registry, &mut slots);
    assert_eq!(
        total,
        64 + 32,
        "half as many again as needed, at least 32, in steps of 32"
    );
    put(&mut registry, 64..100);
    let (apps, total) = slots_of(&registry, &mut slots);
    assert_eq!(
        total, 160,
        "grown when no slot was free: 100 + 32, in steps of 32"
    );
    let mut taken: Vec<u32> = apps.iter().map(|a| a.1).collect();
    taken.sort_unstable();
    taken.dedup();
    assert_eq!(taken.len(), 100, "every app has a slot of its own");
    // Down to 2 apps: 160 slots are far more than 2 need (64): compacted, numbered afresh.
    for n in 0..98 {
        let domain = format!("app{n:04}.example.com");
        registry.delete(&app(&domain, n, "10.0.0.1:80"), 1000 + i64::from(n));
    }
    let (apps, total) = slots_of(&registry, &mut slots);
    assert_eq!(total, 64);
    assert_eq!(
        apps,
        [
            plain("app0098.example.com", 1),
            plain("app0099.example.com", 2)
        ]
    );
    // A burst that overflows the pool: grown as a pool grown ahead of need is (two thirds
    // taken), not to a fresh pool's size.
    put(&mut registry, 100..1100);
    let (_, total) = slots_of(&registry, &mut slots);
    assert_eq!(total, 1504, "1,002 and half as many again, in steps of 32");
}

#[test]
fn the_default_template_renders_the_pool_in_slot_order_with_free_backends() {
    let mut registry = registry("");
    registry.reset(
        vec![
            (app("b.example.com", 1, "10.0.0.1:80"), Vec::new()),
            (app("a.example.com", 2, "10.0.0.2:80"), Vec::new()),
        ],
        1,
    );
    let mut slots = Slots::default();
    let mut model = registry.model(&[]);
    slots.assign(&mut model);
    let mut renderer = Renderer::new(DEFAULT_TEMPLATE).unwrap();
    let rendered = renderer
        .render(&View::of_model(&model), &settings())
        .unwrap();
    let backends: Vec<&str> = rendered
        .config
        .lines()
        .filter_map(|l| l.strip_prefix("backend "))
        .collect();
    let expected: Vec<String> = std::iter::once("legate_no_route".to_owned())
        .chain((1..=64).map(|n| format!("slot_{n}")))
        .collect();
    assert_eq!(backends, expected);
    assert!(
        rendered
            .config
            .contains("backend slot_1\n    mode http\n    balance leastconn\n    server ")
    );
    assert!(
        rendered
            .config
            .contains("backend slot_3\n    mode http\n    balance leastconn\n\nbackend slot_4")
    );
    assert_eq!(
        rendered.maps[0].content,
        "a.example.com slot_1\nb.example.com slot_2\n"
    );
}

#[test]
fn wait_parses_min_max() {
    let ms = Duration::from_millis;
    assert_eq!(
        parse_wait("2ms:100ms"),
        Ok(Wait {
            min: ms(2),
            max: ms(100)
        })
    );
    assert_eq!(
        parse_wait("500ms"),
        Ok(Wait {
            min: ms(500),
            max: ms(2000)
        })
    );
    assert_eq!(
        parse_wait("0:1s"),
        Ok(Wait {
            min: ms(0),
            max: ms(1000)
        })
    );
    for bad in ["", "5", "1s:5ms", "x", "1h", "-1ms", "1ms:11m", "1ms:"] {
        assert!(parse_wait(bad).is_err(), "{bad:?} accepted");
    }
}

/// One registry change of the property test below.
#[derive(Debug, Clone)]
enum Op {
    App(u8, u8, u8),
    Service(u8, u8, u8),
    Host(u8),
    Garbage(u8),
    Delete(usize),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..12u8, 0..6u8, 0..4u8).prop_map(|(d, n, v)| Op::App(d, n, v)),
        2 => (0..4u8, 0..4u8, 0..3u8).prop_map(|(p, n, v)| Op::Service(p, n, v)),
        1 => (0..3u8).prop_map(Op::Host),
        1 => (0..3u8).prop_map(Op::Garbage),
        3 => any::<usize>().prop_map(Op::Delete),
    ]
}

/// A template whose helpers sit inside other blocks: never patched, always walked.
const NESTED: &str = "{{#with maps}}{{#apps}}{{domain}} {{../hosts}}\n{{/apps}}{{/with}}{{#services}}{{port}}{{#slots}} {{slot}}{{/slots}}\n{{/services}}";

/// A template whose blocks read their position and the root's counts, nested helpers and all.
const TRICKY: &str = "# {{app_count}} apps\n{{#apps}}# {{@index}}{{#if @last}} last{{/if}} of {{@root.app_count}}: {{domain}} {{backend}}{{#each servers}} {{name}}{{#if ../wildcard}}*{{/if}}{{/each}}\n{{/apps}}{{#each hosts}}# host {{host_id}}\n{{/each}}{{#slots}}# slot {{slot}} {{domain}}\n{{/slots}}{{#services}}# svc {{port}}{{#each @root.bind_addresses}} {{this}}:{{../port}}{{/each}}\n{{/services}}";

/// A template whose slot blocks read the count of apps (an app that comes changes them all),
/// and whose app blocks are empty for pooled apps.
const COUNTED: &str = "{{#apps}}{{#unless slot}}{{domain}}\n{{/unless}}{{/apps}}{{#slots}}{{slot}} of {{@root.app_count}}: {{domain}}\n{{/slots}}";

/// A template whose app blocks are never empty: an app that comes adds a block.
const LISTED: &str =
    "{{#apps}}{{domain}} {{backend}}\n{{/apps}}{{#slots}}{{slot}} {{domain}}\n{{/slots}}";

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
    /// After any sequence of registry changes, the model kept change by change equals the model
    /// built whole from the same registry (with the slots assigned along the same history), and
    /// the incremental render is byte-identical to a fresh render of it.
    #[test]
    fn incremental_render_equals_full_render(
        batches in proptest::collection::vec(proptest::collection::vec(op(), 1..6), 1..16)
    ) {
        let mut registry = registry("");
        let mut routes = Routes::new(vec![8080], DEFAULT_HEADROOM);
        let mut slots = Slots::default();
        let templates = [DEFAULT_TEMPLATE, TRICKY, NESTED, COUNTED, LISTED];
        let mut renderers = templates.map(|t| Renderer::new(t).unwrap());
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut revision = 1;
        let mut last: [Option<crate::render::Rendered>; 5] = Default::default();
        for batch in batches {
            for op in batch {
                revision += 1;
                let (key, value): (Vec<u8>, Vec<u8>) = match op {
                    Op::App(d, n, v) => {
                        let domain = match d {
                            0 => "*.example.com".to_owned(),
                            // Written in capitals by some other tool: the app of d1.
                            11 => "D1.Example.COM".to_owned(),
                            d => format!("d{d}.example.com"),
                        };
                        let value = [&b""[..], br#"{"check":"tcp"}"#, br#"{"check_path":"/h"}"#, br#"{"weight":7}"#][usize::from(v)];
                        (app(&domain, u32::from(n), &format!("10.0.0.{n}:80")), value.to_vec())
                    }
                    Op::Service(p, n, v) => {
                        let port = [3306, 6379, 8080, 5432][usize::from(p)];
                        let name = ["db", "cache", "other"][usize::from(v)];
                        (service(name, port, u32::from(n), &format!("10.0.1.{n}:{port}")), Vec::new())
                    }
                    Op::Host(h) => (
                        format!("/hosts/host-{h}").into_bytes(),
                        format!(r#"{{"ip":"10.0.2.{h}","instance":"i","version":"1"}}"#).into_bytes(),
                    ),
                    Op::Garbage(g) => (format!("/apps/bad {g}/x").into_bytes(), Vec::new()),
                    Op::Delete(i) => {
                        if !keys.is_empty() {
                            let key = keys.swap_remove(i % keys.len());
                            registry.delete(&key, revision);
                        }
                        continue;
                    }
                };
                registry.put(key.clone(), &value, revision);
                keys.push(key);
            }
            routes.update(&mut registry);
            let mut whole = registry.model(&[8080]);
            slots.assign(&mut whole);
            proptest::prop_assert_eq!(&routes.model(), &whole);
            let view = routes.view();
            for ((renderer, template), last) in
                renderers.iter_mut().zip(templates).zip(&mut last)
            {
                // Made from the last text where the two share, as confgen does.
                let previous = last.as_ref().map(|last| last.config.as_str());
                let incremental = renderer.render_from(&view, &settings(), previous).unwrap();
                let fresh = Renderer::new(template)
                    .unwrap()
                    .render(&View::of_model(&whole), &settings())
                    .unwrap();
                proptest::prop_assert_eq!(&incremental.config, &fresh.config);
                proptest::prop_assert_eq!(&incremental.maps, &fresh.maps);
                proptest::prop_assert!(!(template == NESTED && incremental.patched));
                // The chunks are the text, and what the renderer says two renders share,
                // they share.
                let chunks: String = renderer.chunks().iter().map(|c| &*c.text).collect();
                proptest::prop_assert_eq!(&chunks, &incremental.config);
                if let Some(last) = last.as_ref() {
                    let (since, span) = incremental.shared.unwrap();
                    proptest::prop_assert_eq!(since, last.render);
                    let (old, new) = (last.config.as_bytes(), incremental.config.as_bytes());
                    proptest::prop_assert!(span.prefix + span.suffix <= old.len().min(new.len()));
                    proptest::prop_assert_eq!(&old[..span.prefix], &new[..span.prefix]);
                    proptest::prop_assert_eq!(
                        &old[old.len() - span.suffix..],
                        &new[new.len() - span.suffix..]
                    );
                }
                *last = Some(incremental);
            }
        }
    }
}

#[test]
fn a_changed_app_renders_its_block_alone() {
    let mut registry = registry("");
    let mut routes = Routes::new(Vec::new(), DEFAULT_HEADROOM);
    for n in 0..50 {
        registry.put(
            app(&format!("a{n:02}.example.com"), n, "10.0.0.1:80"),
            b"",
            1,
        );
    }
    routes.update(&mut registry);
    let mut renderer = Renderer::new(DEFAULT_TEMPLATE).unwrap();
    renderer.render(&View::of(&routes), &settings()).unwrap();
    let first = renderer.chunks().to_vec();
    registry.put(app("a07.example.com", 99, "10.0.0.9:80"), b"", 2);
    routes.update(&mut registry);
    let second = renderer.render(&View::of(&routes), &settings()).unwrap();
    assert!(
        !second.patched,
        "a view that does not say what changed is walked"
    );
    // Every block but the changed app's is the very same text as before.
    let rendered_again: Vec<&ChunkKey> = renderer
        .chunks()
        .iter()
        .filter(|c| !matches!(c.key, ChunkKey::Text(_)))
        .filter(|c| !first.iter().any(|f| Arc::ptr_eq(&f.text, &c.text)))
        .map(|c| &c.key)
        .collect();
    assert!(
        matches!(rendered_again.as_slice(), [ChunkKey::Slot(_, 8)]),
        "{rendered_again:#?}"
    );
    assert!(
        second
            .config
            .contains("backend slot_8\n    mode http\n    balance leastconn\n    server ")
    );
}

#[test]
fn a_tight_pool_grows_ahead_and_every_app_keeps_its_slot() {
    let mut registry = registry("");
    let mut routes = Routes::new(Vec::new(), DEFAULT_HEADROOM);
    let put = |registry: &mut Registry, n: u32| {
        registry.put(
            app(&format!("a{n:03}.example.com"), n, "10.0.0.1:80"),
            b"",
            1,
        );
    };
    for n in 0..100 {
        put(&mut registry, n);
    }
    assert!(
        routes.update(&mut registry),
        "the first pool is new backends"
    );
    assert_eq!(routes.slot_count(), 160);
    // New plain domains take free slots: no backend comes or goes.
    let mut n = 100;
    while !routes.pool_tight() {
        put(&mut registry, n);
        assert!(
            !routes.update(&mut registry),
            "domain {n} needed no new backend"
        );
        n += 1;
    }
    assert_eq!(n, 129, "tight beyond 80 % of 160");
    let before: Vec<(String, u32)> = routes
        .apps
        .values()
        .map(|app| (app.domain.clone(), app.slot))
        .collect();
    assert!(routes.grow());
    assert!(!routes.grow(), "no longer tight");
    assert_eq!(
        routes.slot_count(),
        224,
        "at most two thirds taken afterwards"
    );
    let after: Vec<(String, u32)> = routes
        .apps
        .values()
        .map(|app| (app.domain.clone(), app.slot))
        .collect();
    assert_eq!(before, after);
    let rendered = Renderer::new(DEFAULT_TEMPLATE)
        .unwrap()
        .render(&View::of(&routes), &settings())
        .unwrap();
    assert!(rendered.config.contains("\nbackend slot_224\n"));
    // A service port is a backend of its own: its arrival reloads HAProxy anyway.
    registry.put(service("db", 3306, 1, "10.0.0.2:3306"), b"", 2);
    assert!(routes.update(&mut registry));
}

#[test]
fn changes_in_place_patch_the_last_render_and_anything_else_walks() {
    let mut registry = registry("");
    let mut routes = Routes::new(Vec::new(), DEFAULT_HEADROOM);
    for n in 0..20 {
        let domain = format!("a{n:02}.example.com");
        registry.put(app(&domain, n, "10.0.0.1:80"), b"", 1);
        registry.put(app(&domain, n + 100, "10.0.0.2:80"), b"", 1);
    }
    registry.put(service("db", 3306, 1, "10.0.1.1:3306"), b"", 1);
    routes.update(&mut registry);
    // A template whose app block fails for an app with a single server.
    let template = "{{#apps}}{{domain}} {{servers.1.name}}\n{{/apps}}";
    let mut renderers = [DEFAULT_TEMPLATE, template].map(|t| Renderer::new(t).unwrap());
    let walk = |routes: &Routes, template: &str| {
        Renderer::new(template)
            .unwrap()
            .render(&View::of(routes), &settings())
    };
    let view = routes.view();
    for renderer in &mut renderers {
        assert!(!renderer.render(&view, &settings()).unwrap().patched);
    }
    let [renderer, fragile] = &mut renderers;

    // A server more for an app and for a service: only their blocks are rendered again.
    registry.put(app("a07.example.com", 99, "10.0.0.9:80"), b"", 2);
    registry.put(service("db", 3306, 2, "10.0.1.2:3306"), b"", 2);
    routes.update(&mut registry);
    let view = routes.view();
    let patched = renderer.render(&view, &settings()).unwrap();
    assert!(patched.patched);
    assert_eq!(
        patched.config,
        walk(&routes, DEFAULT_TEMPLATE).unwrap().config
    );
    assert!(patched.config.contains(" 10.0.0.9:80 ") && patched.config.contains(" 10.0.1.2:3306 "));
    assert!(fragile.render(&view, &settings()).unwrap().patched);

    // An app down to one server fails the fragile block: the patch gives way to a walk, which
    // names the app.
    registry.delete(&app("a07.example.com", 7, "10.0.0.1:80"), 3);
    registry.delete(&app("a07.example.com", 107, "10.0.0.2:80"), 3);
    routes.update(&mut registry);
    let view = routes.view();
    assert!(renderer.render(&view, &settings()).unwrap().patched);
    match fragile.render(&view, &settings()) {
        Err(RenderError::Items(failed)) => {
            assert_eq!(failed[0].item, Item::App("a07.example.com".to_owned()));
        }
        other => panic!("{other:?}"),
    }

    // A new plain domain takes a free slot, and one goes: no app's block comes or goes (a
    // pooled app has none), so both are patched in; but not where the template's own text
    // reads the count of apps.
    let counting = "# {{app_count}} apps\n{{#slots}}{{slot}} {{domain}}\n{{/slots}}";
    let mut counted = Renderer::new(counting).unwrap();
    counted.render(&view, &settings()).unwrap();
    registry.put(app("new.example.com", 1, "10.0.0.1:80"), b"", 4);
    routes.update(&mut registry);
    let view = routes.view();
    let patched = renderer.render(&view, &settings()).unwrap();
    assert!(patched.patched);
    let walked = counted.render(&view, &settings()).unwrap();
    assert!(!walked.patched);
    assert_eq!(walked.config, walk(&routes, counting).unwrap().config);
    assert_eq!(
        patched.config,
        walk(&routes, DEFAULT_TEMPLATE).unwrap().config
    );
    assert!(patched.config.contains("    server "), "{}", patched.config);
    registry.delete(&app("a03.example.com", 3, "10.0.0.1:80"), 4);
    registry.delete(&app("a03.example.com", 103, "10.0.0.2:80"), 4);
    routes.update(&mut registry);
    let patched = renderer.render(&routes.view(), &settings()).unwrap();
    assert!(patched.patched);
    assert_eq!(
        patched.config,
        walk(&routes, DEFAULT_TEMPLATE).unwrap().config
    );

    // A new wildcard domain has a backend of its own: walked.
    registry.put(app("*.new.example.com", 1, "10.0.0.1:80"), b"", 4);
    routes.update(&mut registry);
    let walked = renderer.render(&routes.view(), &settings()).unwrap();
    assert!(!walked.patched);
    assert_eq!(
        walked.config,
        walk(&routes, DEFAULT_TEMPLATE).unwrap().config
    );

    // A view the renderer did not see (its render failed, say) hides changes: walked.
    registry.put(app("a08.example.com", 98, "10.0.0.8:80"), b"", 5);
    routes.update(&mut registry);
    drop(routes.view());
    registry.put(app("a09.example.com", 97, "10.0.0.7:80"), b"", 6);
    routes.update(&mut registry);
    let walked = renderer.render(&routes.view(), &settings()).unwrap();
    assert!(!walked.patched);
    assert!(walked.config.contains(" 10.0.0.8:80 "));
    assert_eq!(
        walked.config,
        walk(&routes, DEFAULT_TEMPLATE).unwrap().config
    );

    // Patch after patch: each leaves the outputs it replaced behind, and a walk now and then
    // lets them go.
    let mut walks = 0;
    for round in 0..120u32 {
        let domain = format!("a{:02}.example.com", round % 20);
        registry.put(app(&domain, 1000 + round, "10.0.3.1:80"), b"", 7);
        routes.update(&mut registry);
        let rendered = renderer.render(&routes.view(), &settings()).unwrap();
        walks += u32::from(!rendered.patched);
        assert_eq!(
            rendered.config,
            walk(&routes, DEFAULT_TEMPLATE).unwrap().config
        );
    }
    assert!((1..=6).contains(&walks), "{walks} walks in 120 renders");
}

/// A generator over a batch channel, running with paused time: the sender of its batches, the
/// snapshots it publishes, and the token that stops it.
fn generator(
    wait: Wait,
) -> (
    tokio::sync::mpsc::Sender<crate::watcher::Batch>,
    tokio::sync::watch::Receiver<Option<Arc<v1::ConfigSnapshot>>>,
    tokio_util::sync::CancellationToken,
) {
    let (snapshots, snapshot_rx) = tokio::sync::watch::channel(None);
    let generator = crate::Generator {
        registry: registry(""),
        routes: Routes::new(vec![8080], DEFAULT_HEADROOM),
        renderer: Renderer::new(DEFAULT_TEMPLATE).unwrap(),
        settings: settings(),
        snapshots,
        published: None,
        models: Arc::default(),
        status: Arc::new(crate::api::Status::new(Duration::from_secs(60), 16)),
        output: None,
        health: tonic_health::server::health_reporter().0,
        serving: false,
        log_throttle: legate_proto::runtime::Throttle::new(Duration::from_secs(10)),
    };
    let (batches, batch_rx) = tokio::sync::mpsc::channel(8);
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(generator.run(batch_rx, wait, shutdown.clone()));
    (batches, snapshot_rx, shutdown)
}

/// The next snapshot, within a (paused) minute.
async fn next_snapshot(
    snapshots: &mut tokio::sync::watch::Receiver<Option<Arc<v1::ConfigSnapshot>>>,
) -> Arc<v1::ConfigSnapshot> {
    tokio::time::timeout(Duration::from_secs(60), snapshots.changed())
        .await
        .expect("no snapshot within a minute")
        .unwrap();
    snapshots.borrow_and_update().clone().unwrap()
}

/// Regression: a change rendered at once (after a quiet spell) that left the backend pool
/// tight never scheduled its growth at the next quiet moment: the pool stayed tight until some
/// later change, and could fill up, putting a reload in a new domain's path.
#[tokio::test(start_paused = true)]
async fn a_pool_made_tight_by_a_change_rendered_at_once_grows_at_the_next_quiet_moment() {
    use crate::watcher::{Batch, Event};
    let wait = Wait {
        min: Duration::from_millis(10),
        max: Duration::from_millis(100),
    };
    let (batches, mut snapshots, shutdown) = generator(wait);
    let key = |n: u32| app(&format!("app{n}.example.com"), n, "10.0.0.1:8000");
    let kvs = (1..=20).map(|n| (key(n), VALUE.to_vec())).collect();
    batches
        .send(Batch::Reset { kvs, revision: 1 })
        .await
        .unwrap();
    let fresh = next_snapshot(&mut snapshots).await;
    let slots = |snapshot: &v1::ConfigSnapshot| {
        (1..)
            .take_while(|n| {
                snapshot
                    .haproxy_config
                    .contains(&format!("backend slot_{n}\n"))
            })
            .count()
    };
    assert_eq!(slots(&fresh), 64, "a fresh pool for 20 apps");

    // After a quiet spell, 32 more apps in one response (52 of 64: tight), rendered at once.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let events = (21..=52)
        .map(|n| Event::Put {
            key: key(n),
            value: VALUE.to_vec(),
            revision: i64::from(n),
        })
        .collect();
    batches.send(Batch::Events(events)).await.unwrap();
    let tight = next_snapshot(&mut snapshots).await;
    let hosts = tight.maps.iter().find(|m| m.name == "hosts.map").unwrap();
    assert!(
        hosts.content.contains("app52.example.com"),
        "rendered with the change"
    );
    assert_eq!(slots(&tight), 64, "not grown with the change");

    // Nothing else changes: the pool grows at the next quiet moment.
    let grown = next_snapshot(&mut snapshots).await;
    let grown = slots(&grown);
    assert!(
        grown > 64 && 52 * 5 <= grown * 4,
        "grown out of tightness: {grown} slots"
    );
    shutdown.cancel();
}
