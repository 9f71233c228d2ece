//! Rendering a [`Model`] into an HAProxy configuration with a handlebars template.
//!
//! The template sees a [`Context`]: the listener settings, the names of the map files and the
//! live hosts; apps and services are iterated with the block helpers `{{#apps}}...{{/apps}}`
//! and `{{#services}}...{{/services}}`, inside which the context is one app or service. They
//! stream: handlebars turns its data into JSON, and the JSON of 10,000 apps would take more
//! memory than everything else confgen holds, so only one app's JSON exists at a time.
//! Handlebars runs in strict mode (a field that does not exist is an error, not an empty
//! string) with HTML escaping off: every value in the context has passed the registry
//! validation, so none can carry configuration syntax. The map files are not templated:
//! confgen writes them from the model, so the supervisor can change their entries at runtime.

use std::net::IpAddr;
use std::sync::Arc;

use handlebars::{
    BlockContext, Context as HbContext, Handlebars, Helper, HelperDef, HelperResult, Output,
    RenderContext, Renderable, StringOutput, to_json,
};
use legate_proto::v1;
use serde::Serialize;

use crate::model::{self, HOSTS_MAP, Model, WILDCARDS_MAP};

/// The template used without `--template`.
pub const DEFAULT_TEMPLATE: &str = include_str!("../templates/default.cfg.hbs");

const NAME: &str = "haproxy";

/// Why a template could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The template does not compile.
    #[error("template does not compile: {0}")]
    Template(#[from] Box<handlebars::TemplateError>),
    /// The template failed on this model.
    #[error("template failed to render: {0}")]
    Render(#[from] Box<handlebars::RenderError>),
    /// The output asks for something no configuration may (`legate_proto::policy`): a
    /// `global` section, a file outside the allowed directories, a Unix socket, Lua, ...
    #[error("rendered configuration refused: {0}")]
    Policy(#[from] legate_proto::policy::Violation),
    /// Cannot happen: handlebars writes strings only.
    #[error("rendered configuration is not UTF-8")]
    NotUtf8,
    /// These apps or services failed to render, and only they: the caller renders again
    /// without them.
    #[error("{} app(s) or service(s) failed to render", .0.len())]
    Items(Vec<ItemFailure>),
}

/// An app or service whose block of the template failed to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemFailure {
    /// Which one.
    pub item: Item,
    /// Handlebars' error.
    pub error: String,
}

/// An app or service of the rendered model, by its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Item {
    /// `model.apps[i]`.
    App(usize),
    /// `model.services[i]`.
    Service(usize),
}

/// What a template renders with, besides the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Addresses the HTTP frontend (on `http_port`) and the TCP service listeners (on their
    /// service ports) bind; never empty.
    pub binds: Vec<IpAddr>,
    /// Port of the HTTP frontend.
    pub http_port: u16,
    /// Who renders, e.g. `confgen@host-a`.
    pub generator: String,
    /// Directories whose files the output may name (certificates, error pages); none by default.
    pub allowed_file_dirs: Vec<std::path::PathBuf>,
}

/// Names of the map files, as the template refers to them.
#[derive(Debug, Serialize)]
struct MapNames {
    hosts: &'static str,
    wildcards: &'static str,
}

/// The data a template sees (documented in the "Templates" section of docs/configuration.md).
#[derive(Debug, Serialize)]
struct Context<'a> {
    generator: &'a str,
    /// `address:port` of the HTTP frontend, comma-separated for several addresses, e.g.
    /// `127.0.0.1:80,172.17.0.1:80` or `[::]:80`.
    http_bind: String,
    http_port: u16,
    /// Addresses for `bind <address>:<port>` lines, e.g. `127.0.0.1` or `[::]`.
    bind_addresses: Vec<String>,
    /// The first of `bind_addresses` (templates written for a single address).
    bind_address: String,
    maps: MapNames,
    hosts: &'a [v1::Host],
    app_count: usize,
    service_count: usize,
    /// Size of the backend pool.
    slot_count: u32,
}

/// A rendered configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The HAProxy configuration, without `global`.
    pub config: String,
    /// The map files it refers to, ordered by name.
    pub maps: Vec<v1::ConfigFile>,
    /// `legate_proto::checksum` of both.
    pub checksum: String,
}

/// A compiled template.
#[derive(Debug)]
pub struct Renderer {
    handlebars: Handlebars<'static>,
    /// Length of the last output: the next one is written into a buffer of about this size
    /// rather than one grown by doubling, which would copy it and leave the smaller buffers
    /// behind in the heap.
    last_len: usize,
}

impl Renderer {
    /// Compiles `template`.
    pub fn new(template: &str) -> Result<Self, RenderError> {
        let mut handlebars = Handlebars::new();
        handlebars.set_strict_mode(true);
        handlebars.register_escape_fn(handlebars::no_escape);
        handlebars
            .register_template_string(NAME, template)
            .map_err(Box::new)?;
        Ok(Self {
            handlebars,
            last_len: 0,
        })
    }

    /// Renders `model`.
    pub fn render(
        &mut self,
        model: &Arc<Model>,
        settings: &Settings,
    ) -> Result<Rendered, RenderError> {
        let bind_addresses: Vec<String> = settings
            .binds
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("[{ip}]"),
            })
            .collect();
        let http_bind: Vec<String> = bind_addresses
            .iter()
            .map(|address| format!("{address}:{}", settings.http_port))
            .collect();
        let context = Context {
            generator: &settings.generator,
            http_bind: http_bind.join(","),
            http_port: settings.http_port,
            bind_address: bind_addresses.first().cloned().unwrap_or_default(),
            bind_addresses,
            maps: MapNames {
                hosts: HOSTS_MAP,
                wildcards: WILDCARDS_MAP,
            },
            hosts: &model.hosts,
            app_count: model.apps.len(),
            service_count: model.services.len(),
            slot_count: model.slots,
        };
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        for section in SECTIONS {
            let helper = Sections {
                model: model.clone(),
                section,
                failures: failures.clone(),
            };
            self.handlebars
                .register_helper(section.name(), Box::new(helper));
        }
        let mut buffer = Vec::with_capacity(self.last_len + self.last_len / 16);
        let config = self
            .handlebars
            .render_to_write(NAME, &context, &mut buffer)
            .map(|()| buffer);
        // The helpers hold the model: let it go with the render.
        for section in SECTIONS {
            self.handlebars.unregister_helper(section.name());
        }
        let config = config.map_err(Box::new)?;
        let mut failures = std::mem::take(&mut *failures.lock().unwrap_or_else(|e| e.into_inner()));
        if !failures.is_empty() {
            failures.sort_by_key(|f| f.item);
            failures.dedup_by_key(|f| f.item);
            return Err(RenderError::Items(failures));
        }
        // The template and every value in the context are UTF-8.
        let config = String::from_utf8(config).map_err(|_| RenderError::NotUtf8)?;
        self.last_len = config.len();
        let maps = model::maps(model);
        let policy = legate_proto::policy::Policy {
            maps: maps.iter().map(|m| m.name.as_str()).collect(),
            allowed_dirs: &settings.allowed_file_dirs,
        };
        legate_proto::policy::check(&config, &policy)?;
        let checksum = legate_proto::checksum(&config, &maps);
        Ok(Rendered {
            config,
            maps,
            checksum,
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Section {
    Apps,
    Services,
    Slots,
}

const SECTIONS: [Section; 3] = [Section::Apps, Section::Services, Section::Slots];

impl Section {
    fn name(self) -> &'static str {
        match self {
            Section::Apps => "apps",
            Section::Services => "services",
            Section::Slots => "slots",
        }
    }
}

/// One backend of the pool, as `{{#slots}}` shows it.
#[derive(Debug, Serialize)]
struct Slot<'a> {
    slot: u32,
    backend: String,
    /// Whether no app uses it: then `domain` is empty and `servers` too.
    free: bool,
    domain: &'a str,
    servers: &'a [v1::Server],
}

/// The `{{#apps}}`, `{{#services}}` and `{{#slots}}` block helpers: render their block once per
/// app, service or pooled backend, with it as the context and `@index`, `@first`, `@last` set,
/// like `#each`.
///
/// A block that fails for one app or service (a custom template reaching a field that this app
/// lacks, in strict mode) is left out and recorded in `failures`, and the others render on: one
/// bad registration must not freeze every later change. A free slot that fails is the
/// template's fault, not an app's: that fails the render.
struct Sections {
    model: Arc<Model>,
    section: Section,
    failures: Arc<std::sync::Mutex<Vec<ItemFailure>>>,
}

/// A local variable that marks the helper's own block, to find it again under the blocks that
/// a failed render left pushed.
const MARK: &str = "legate_block";

/// Pops the blocks that a failed render of one item left above the helper's own.
fn unwind_to_mark(rc: &mut RenderContext<'_, '_>) {
    while rc.block().is_some_and(|b| b.get_local_var(MARK).is_none()) {
        rc.pop_block();
    }
}

impl HelperDef for Sections {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc HbContext,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let Some(template) = h.template() else {
            return Ok(());
        };
        // The index of the app in each slot, for `{{#slots}}`.
        let mut slots: Vec<Option<usize>> = Vec::new();
        if let Section::Slots = self.section {
            slots.resize(self.model.slots as usize, None);
            for (index, app) in self.model.apps.iter().enumerate() {
                if let Some(entry) = (app.slot as usize)
                    .checked_sub(1)
                    .and_then(|i| slots.get_mut(i))
                {
                    *entry = Some(index);
                }
            }
        }
        let len = match self.section {
            Section::Apps => self.model.apps.len(),
            Section::Services => self.model.services.len(),
            Section::Slots => slots.len(),
        };
        let mut block = BlockContext::new();
        block.set_local_var(MARK, to_json(true));
        rc.push_block(block);
        for i in 0..len {
            let (value, item) = match self.section {
                Section::Apps => (to_json(&self.model.apps[i]), Some(Item::App(i))),
                Section::Services => (to_json(&self.model.services[i]), Some(Item::Service(i))),
                Section::Slots => {
                    let slot = u32::try_from(i + 1).unwrap_or(u32::MAX);
                    let index = slots.get(i).copied().flatten();
                    let app = index.map(|index| &self.model.apps[index]);
                    let value = to_json(Slot {
                        slot,
                        backend: model::slot_backend(slot),
                        free: app.is_none(),
                        domain: app.map_or("", |app| app.domain.as_str()),
                        servers: app.map_or(&[], |app| app.servers.as_slice()),
                    });
                    (value, index.map(Item::App))
                }
            };
            if let Some(block) = rc.block_mut() {
                block.set_base_value(value);
                block.set_local_var("index", to_json(i));
                block.set_local_var("first", to_json(i == 0));
                block.set_local_var("last", to_json(i + 1 == len));
            }
            let mut buffer = StringOutput::new();
            match (template.render(r, ctx, rc, &mut buffer), item) {
                (Ok(()), _) => out.write(&buffer.into_string()?)?,
                (Err(e), Some(item)) => {
                    unwind_to_mark(rc);
                    self.failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(ItemFailure {
                            item,
                            error: e.to_string(),
                        });
                }
                (Err(e), None) => {
                    unwind_to_mark(rc);
                    rc.pop_block();
                    return Err(e);
                }
            }
        }
        rc.pop_block();
        Ok(())
    }
}
