//! Rendering the model ([`View`]) into an HAProxy configuration with a handlebars template.
//!
//! The template sees a [`Context`]: the listener settings, the names of the map files and the
//! live hosts; apps, services and pooled backends are iterated with the block helpers
//! `{{#apps}}...{{/apps}}`, `{{#services}}...{{/services}}` and `{{#slots}}...{{/slots}}`,
//! inside which the context is one app, service or slot. They stream: handlebars turns its
//! data into JSON, and the JSON of 10,000 apps would take more memory than everything else
//! confgen holds, so only one item's JSON exists at a time.
//!
//! Rendering is incremental: the output of each item's block is kept, and the next render
//! reuses it as long as the item is the same (the model keeps an unchanged app or service as
//! the same `Arc`) and nothing else the block reads changed ([`Deps`], read from the block's
//! template once: its position `@index`/`@first`/`@last`, or the root's counts and hosts). A
//! change to one app renders that app's block and no other. The output is kept as [`Chunk`]s,
//! the items' blocks and the template text between the helpers, so the policy check also runs
//! only on chunks it has not seen.
//! Handlebars runs in strict mode (a field that does not exist is an error, not an empty
//! string) with HTML escaping off: every value in the context has passed the registry
//! validation, so none can carry configuration syntax. The map files are not templated:
//! confgen writes them from the model, so the supervisor can change their entries at runtime.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use handlebars::template::{Parameter, TemplateElement};
use handlebars::{
    BlockContext, Context as HbContext, Handlebars, Helper, HelperDef, HelperResult, Output, Path,
    RenderContext, Renderable, StringOutput, Template, to_json,
};
use legate_proto::snapshot::Span;
use legate_proto::v1;
use serde::Serialize;

use crate::model::{self, HOSTS_MAP, Model, Routes, Touched, WILDCARDS_MAP};

/// The template used without `--template`.
pub const DEFAULT_TEMPLATE: &str = include_str!("../templates/default.cfg.hbs");

const NAME: &str = "haproxy";

/// Where a helper's items go in the top-level output, which is cut there afterwards: no
/// template or value can contain it (templates are refused with it, values are validated).
const MARK: char = '\0';

/// Why a template could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The template does not compile.
    #[error("template does not compile: {0}")]
    Template(#[from] Box<handlebars::TemplateError>),
    /// The template holds a NUL character.
    #[error("template does not compile: it holds a NUL character")]
    Nul,
    /// The template failed on this model.
    #[error("template failed to render: {0}")]
    Render(#[from] Box<handlebars::RenderError>),
    /// The output asks for something no configuration may (`legate_proto::policy`): a
    /// `global` section, a file outside the allowed directories, a Unix socket, Lua, ...
    #[error("rendered configuration refused: {0}")]
    Policy(#[from] legate_proto::policy::Violation),
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

/// An app or service of the model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Item {
    /// The app of this domain.
    App(String),
    /// The service on this port.
    Service(u16),
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

/// The fields of [`Context`] that change with the registry; the others are settings.
const CHANGING: [&str; 4] = ["hosts", "app_count", "service_count", "slot_count"];

/// The model as the renderer reads it: shared, ordered, each item an `Arc` that stays the same
/// while the item does.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Apps by domain.
    pub apps: Arc<BTreeMap<String, Arc<v1::App>>>,
    /// Services by port.
    pub services: Arc<BTreeMap<u16, Arc<v1::Service>>>,
    /// The app in each pooled slot (index: slot - 1).
    pub pool: Arc<Vec<Option<Arc<v1::App>>>>,
    /// Live hosts.
    pub hosts: Arc<Vec<v1::Host>>,
    /// Items left out (their block failed to render).
    pub excluded: BTreeSet<Item>,
    /// Changes so far to what the map files say (a domain, its backend, whether a wildcard),
    /// when the model counts them ([`Routes`]): the same count, the same maps.
    pub maps_generation: Option<u64>,
    /// What changed since the previous view of the same [`Routes`] ([`Routes::view`]): a
    /// renderer whose last render was of that view renders only the blocks of what changed.
    pub touched: Option<Arc<Touched>>,
}

impl View {
    /// The model that `routes` keeps.
    pub fn of(routes: &Routes) -> Self {
        Self {
            apps: routes.apps.clone(),
            services: routes.services.clone(),
            pool: routes.pool.clone(),
            hosts: routes.hosts.clone(),
            excluded: BTreeSet::new(),
            maps_generation: Some(routes.maps_generation()),
            touched: None,
        }
    }

    /// A model built whole ([`crate::model::Registry::model`], slots assigned).
    pub fn of_model(model: &Model) -> Self {
        let apps: BTreeMap<String, Arc<v1::App>> = model
            .apps
            .iter()
            .map(|app| (app.domain.clone(), Arc::new(app.clone())))
            .collect();
        let mut pool = vec![None; model.slots as usize];
        for app in apps.values().filter(|app| app.slot > 0) {
            if let Some(entry) = pool.get_mut(app.slot as usize - 1) {
                *entry = Some(app.clone());
            }
        }
        Self {
            services: Arc::new(
                model
                    .services
                    .iter()
                    .map(|service| (service.port as u16, Arc::new(service.clone())))
                    .collect(),
            ),
            apps: Arc::new(apps),
            pool: Arc::new(pool),
            hosts: Arc::new(model.hosts.clone()),
            excluded: BTreeSet::new(),
            maps_generation: None,
            touched: None,
        }
    }

    fn app_excluded(&self, app: &v1::App) -> bool {
        !self.excluded.is_empty() && self.excluded.contains(&Item::App(app.domain.clone()))
    }

    fn service_excluded(&self, service: &v1::Service) -> bool {
        !self.excluded.is_empty() && self.excluded.contains(&Item::Service(service.port as u16))
    }

    /// The apps rendered, in domain order.
    pub fn apps(&self) -> impl Iterator<Item = &Arc<v1::App>> {
        self.apps.values().filter(|app| !self.app_excluded(app))
    }

    /// How many apps are rendered: without a walk over them when none is left out.
    pub fn app_count(&self) -> usize {
        if self.excluded.is_empty() {
            self.apps.len()
        } else {
            self.apps().count()
        }
    }

    /// How many services are rendered.
    pub fn service_count(&self) -> usize {
        if self.excluded.is_empty() {
            self.services.len()
        } else {
            self.services().count()
        }
    }

    /// The services rendered, in port order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<v1::Service>> {
        self.services
            .values()
            .filter(|service| !self.service_excluded(service))
    }
}

/// A piece of the rendered configuration: an item's block, or template text between helpers.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Where it comes from.
    pub key: ChunkKey,
    /// The text.
    pub text: Arc<str>,
}

/// What a [`Chunk`] is, in output order: the template text before helper invocation `n`
/// (`Text(n)`; the last one follows every invocation) and each item of invocation `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKey {
    /// Template text before invocation `n`.
    Text(u32),
    /// An app's block in invocation `n`.
    App(u32),
    /// A pooled backend's block in invocation `n`.
    Slot(u32, u32),
    /// A service's block in invocation `n`, by port.
    Service(u32, u16),
}

/// A rendered configuration.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The HAProxy configuration, without `global`.
    pub config: String,
    /// The map files it refers to, ordered by name.
    pub maps: Vec<v1::ConfigFile>,
    /// This render's number in its renderer.
    pub render: u64,
    /// The number of the renderer's previous good render and what the two texts share at
    /// their start and end (found from the chunks: no text is compared).
    pub shared: Option<(u64, Span)>,
    /// Whether it patched the previous render rather than walking every item.
    pub patched: bool,
}

impl PartialEq for Rendered {
    fn eq(&self, other: &Self) -> bool {
        self.config == other.config && self.maps == other.maps
    }
}

/// A compiled template, and the output of its last renders.
#[derive(Debug)]
pub struct Renderer {
    handlebars: Handlebars<'static>,
    /// Length of the last output: the next one is written into a buffer of about this size
    /// rather than one grown by doubling, which would copy it and leave the smaller buffers
    /// behind in the heap.
    last_len: usize,
    state: Arc<Mutex<State>>,
    /// The policy's verdict on each chunk of the last render, by the address of the chunk's
    /// text (kept alive in the entry, so that the address is not reused meanwhile).
    checked: AddressMap<usize, Checked>,
    /// The maps of the last render, with the view's maps generation and exclusions they were
    /// made for.
    maps: Option<(u64, BTreeSet<Item>, Vec<v1::ConfigFile>)>,
    /// The last good render, in chunks.
    last: Option<Last>,
    /// Whether the template, outside its model helpers' blocks, may read how many apps or
    /// services there are ([`reads_counts`]): then an app that comes or goes takes a walk.
    counts: bool,
}

/// The last good render: what the next one may patch instead of walking every item again.
#[derive(Debug)]
struct Last {
    /// Its number ([`State::render`]).
    render: u64,
    /// The [`View::touched`] view it rendered, if the view said.
    view: Option<u64>,
    settings: Settings,
    /// Whether items were left out.
    excluded: bool,
    /// The configuration in chunks, in order.
    chunks: Vec<Chunk>,
    /// The configuration's length.
    len: usize,
    /// Each helper invocation of the template, in order.
    placed: Vec<Placed>,
    /// Kept outputs the patches since the last walk made, each making one stale: a walk lets
    /// the stale ones go.
    stale: usize,
}

/// Where a helper invocation's items are in [`Last::chunks`].
#[derive(Debug)]
struct Placed {
    /// Its block ([`State::blocks`]).
    block: usize,
    section: Section,
    /// Invoked inside another block (`with`, `each`): its items see more than the root.
    nested: bool,
    /// For each item, in order, the index of its chunk ([`EMPTY`]: its output is empty).
    at: Vec<u32>,
}

/// An item whose output is empty has no chunk.
const EMPTY: u32 = u32::MAX;

/// Most changed items a render patches: beyond them it walks every item (with their kept
/// blocks) in one pass, which costs about the same.
const PATCH_MAX: usize = 64;

/// One helper invocation of a render, as the helper leaves it.
#[derive(Debug)]
struct Invocation {
    block: usize,
    section: Section,
    nested: bool,
    /// The items' outputs that are not empty, in order.
    chunks: Vec<Chunk>,
    /// For each item, the index of its chunk in `chunks`, or [`EMPTY`].
    at: Vec<u32>,
}

/// The policy's verdict on one chunk.
#[derive(Debug)]
struct Checked {
    text: Arc<str>,
    /// The section it starts in, and ends in.
    from: &'static str,
    to: &'static str,
    lines: usize,
    used: u64,
}

/// What the helpers share across renders: each block's kept output.
#[derive(Debug, Default)]
struct State {
    /// Renders so far.
    render: u64,
    /// Changes to the changing part of the root context ([`CHANGING`]) so far.
    generation: u64,
    /// The changing part of the root context at the last render, hashed.
    root: u64,
    blocks: AddressMap<usize, Block>,
    /// This render's invocations, in output order, with their chunks.
    invocations: Vec<Invocation>,
    failures: Vec<ItemFailure>,
    /// Whether an item's block is being rendered (a helper inside writes straight into it).
    in_item: bool,
}

/// One block of a helper in the template.
#[derive(Debug)]
struct Block {
    /// The block's template, to render one item outside a walk.
    template: Template,
    deps: Deps,
    /// The render in which it was last invoked.
    invoked: u64,
    items: AddressMap<CacheKey, Kept>,
}

/// What an item's kept output is found by: its address (a slot's number and its app's).
type CacheKey = (usize, usize);

/// A map keyed by addresses, which need no protection against chosen collisions.
type AddressMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<AddressHasher>>;

/// A hasher for keys made of addresses and small numbers: a multiply and a rotate per word.
#[derive(Debug, Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
}

/// The output of one item's block, with what it was rendered from.
#[derive(Debug)]
struct Kept {
    /// The item, kept alive so that its address is not reused while it is a key.
    _item: Option<Holder>,
    /// `@index`, `@first`, `@last`, when the block reads them.
    position: Option<(usize, bool, bool)>,
    /// [`State::generation`], when the block reads the changing root.
    generation: Option<u64>,
    output: Result<Arc<str>, String>,
    used: u64,
}

#[derive(Debug)]
enum Holder {
    App(#[allow(dead_code)] Arc<v1::App>),
    Service(#[allow(dead_code)] Arc<v1::Service>),
}

/// What a block's output depends on besides its item, read from its template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deps {
    /// `@index`, `@first` or `@last` of the block.
    pub position: bool,
    /// The changing part of the root context ([`CHANGING`]), or something outside the item
    /// that cannot be told apart from it.
    pub root: bool,
    /// Cannot be kept at all: a helper of the model, a partial or a decorator inside.
    pub never: bool,
}

impl Deps {
    /// Reads the dependencies of the block `template` of a model helper.
    pub fn of(template: &Template) -> Self {
        let mut deps = Self::default();
        deps.walk(template, 0);
        deps
    }

    /// `depth`: blocks entered inside the helper's own (`each`, `with`).
    fn walk(&mut self, template: &Template, depth: usize) {
        for element in &template.elements {
            self.element(element, depth);
        }
    }

    fn element(&mut self, element: &TemplateElement, depth: usize) {
        match element {
            TemplateElement::RawString(_) | TemplateElement::Comment(_) => {}
            TemplateElement::HtmlExpression(h)
            | TemplateElement::Expression(h)
            | TemplateElement::HelperBlock(h) => {
                let name = match &h.name {
                    Parameter::Name(name) => name.as_str(),
                    other => {
                        self.parameter(other, depth);
                        ""
                    }
                };
                if SECTIONS.iter().any(|s| s.name() == name) {
                    self.never = true;
                }
                for parameter in h.params.iter().chain(h.hash.values()) {
                    self.parameter(parameter, depth);
                }
                let inner = if matches!(name, "each" | "with") {
                    depth + 1
                } else {
                    depth
                };
                if let Some(block) = &h.template {
                    self.walk(block, inner);
                }
                if let Some(inverse) = &h.inverse {
                    self.walk(inverse, depth);
                }
            }
            _ => self.never = true,
        }
    }

    fn parameter(&mut self, parameter: &Parameter, depth: usize) {
        match parameter {
            Parameter::Name(_) | Parameter::Literal(_) => {}
            Parameter::Path(Path::Local((level, _, _))) => match level.cmp(&depth) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => self.position = true,
                std::cmp::Ordering::Greater => self.root = true,
            },
            Parameter::Path(Path::Relative((_, raw))) => {
                let mut rest = raw.trim_start_matches("./");
                let mut ups = 0;
                while let Some(r) = rest.strip_prefix("../") {
                    rest = r;
                    ups += 1;
                }
                let root = rest
                    .strip_prefix("@root")
                    .map(|r| r.trim_start_matches(['.', '/']));
                let outside = match root {
                    Some(r) => Some(r),
                    None if ups > depth => Some(rest),
                    None => None,
                };
                if let Some(path) = outside {
                    let field = path.split(['.', '/', '[']).next().unwrap_or_default();
                    if field.is_empty() || CHANGING.contains(&field) || ups > depth + 1 {
                        self.root = true;
                    }
                }
            }
            Parameter::Subexpression(sub) => self.element(&sub.element, depth),
            _ => self.never = true,
        }
    }
}

impl Renderer {
    /// Compiles `template`.
    pub fn new(template: &str) -> Result<Self, RenderError> {
        if template.contains(MARK) {
            return Err(RenderError::Nul);
        }
        let mut handlebars = Handlebars::new();
        handlebars.set_strict_mode(true);
        handlebars.register_escape_fn(handlebars::no_escape);
        handlebars
            .register_template_string(NAME, template)
            .map_err(Box::new)?;
        let counts = handlebars.get_template(NAME).is_none_or(reads_counts);
        Ok(Self {
            counts,
            handlebars,
            last_len: 0,
            state: Arc::default(),
            checked: AddressMap::default(),
            maps: None,
            last: None,
        })
    }

    /// The last good render's text in chunks, in order.
    pub fn chunks(&self) -> &[Chunk] {
        self.last.as_ref().map_or(&[], |last| &last.chunks)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Renders `view`: by patching the last render where only apps and services changed in
    /// place since it ([`View::touched`]), else by walking every item (their blocks kept).
    pub fn render(&mut self, view: &View, settings: &Settings) -> Result<Rendered, RenderError> {
        self.render_from(view, settings, None)
    }

    /// The number of the last good render.
    pub fn last_render(&self) -> Option<u64> {
        self.last.as_ref().map(|last| last.render)
    }

    /// [`Renderer::render`], with `previous`, the text of the last good render
    /// ([`Renderer::last_render`]), when the caller holds it: the new text is then made of its
    /// shared start and end and the chunks between, rather than copied chunk by chunk.
    pub fn render_from(
        &mut self,
        view: &View,
        settings: &Settings,
        previous: Option<&str>,
    ) -> Result<Rendered, RenderError> {
        if let Some(mut last) = self.last.take() {
            let patched = self.patch(&mut last, view, settings, previous);
            self.last = Some(last);
            if let Some(rendered) = patched {
                return Ok(rendered);
            }
        }
        self.walk(view, settings, previous)
    }

    /// The text of `chunks`: from `previous`, the text of [`Last`], where the two share `span`
    /// (when it is that text), else chunk by chunk.
    fn text(&mut self, chunks: &[Chunk], previous: Option<&str>, shared: Option<Span>) -> String {
        let last_len = self.last.as_ref().map(|last| last.len);
        let text = match (previous, shared) {
            (Some(previous), Some(span)) if Some(previous.len()) == last_len => {
                splice(previous, chunks, span)
            }
            _ => concat(chunks, self.last_len),
        };
        self.last_len = text.len();
        text
    }

    /// Renders `view` by walking the template and every item.
    fn walk(
        &mut self,
        view: &View,
        settings: &Settings,
        previous: Option<&str>,
    ) -> Result<Rendered, RenderError> {
        let context = context(view, settings, view.app_count(), view.service_count());
        let render = {
            let mut state = self.state();
            state.render += 1;
            let root = root_hash(&context);
            if root != state.root || state.render == 1 {
                state.root = root;
                state.generation += 1;
            }
            state.invocations.clear();
            state.failures.clear();
            state.in_item = false;
            state.render
        };
        for section in SECTIONS {
            let helper = Sections {
                view: view.clone(),
                section,
                state: self.state.clone(),
            };
            self.handlebars
                .register_helper(section.name(), Box::new(helper));
        }
        let mut buffer = Vec::with_capacity(self.last_len + self.last_len / 16);
        let top = self
            .handlebars
            .render_to_write(NAME, &context, &mut buffer)
            .map(|()| buffer);
        // The helpers hold the model: let it go with the render.
        for section in SECTIONS {
            self.handlebars.unregister_helper(section.name());
        }
        let (invocations, mut failures) = {
            let mut state = self.state();
            // An invoked block let go of the items it did not use itself.
            for block in state.blocks.values_mut() {
                if block.invoked != render {
                    block.items.clear();
                }
            }
            (
                std::mem::take(&mut state.invocations),
                std::mem::take(&mut state.failures),
            )
        };
        let top = top.map_err(Box::new)?;
        if !failures.is_empty() {
            failures.sort_by(|a, b| a.item.cmp(&b.item));
            failures.dedup_by(|a, b| a.item == b.item);
            return Err(RenderError::Items(failures));
        }
        // The template and every value in the context are UTF-8.
        let top = String::from_utf8(top)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        let mut chunks =
            Vec::with_capacity(invocations.iter().map(|i| i.chunks.len()).sum::<usize>() + 2);
        let mut placed = Vec::with_capacity(invocations.len());
        let mut invocations = invocations.into_iter();
        for (n, piece) in top.split(MARK).enumerate() {
            if !piece.is_empty() {
                chunks.push(Chunk {
                    key: ChunkKey::Text(u32::try_from(n).unwrap_or(u32::MAX)),
                    text: Arc::from(piece),
                });
            }
            if let Some(invocation) = invocations.next() {
                let base = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
                let at = invocation.at.iter();
                placed.push(Placed {
                    block: invocation.block,
                    section: invocation.section,
                    nested: invocation.nested,
                    at: at
                        .map(|&i| if i == EMPTY { EMPTY } else { base + i })
                        .collect(),
                });
                chunks.extend(invocation.chunks);
            }
        }
        let shared = self
            .last
            .as_ref()
            .map(|last| (last.render, shared_span(&last.chunks, &chunks)));
        let config = self.text(&chunks, previous, shared.map(|(_, span)| span));
        let maps = self.maps(view);
        let policy = legate_proto::policy::Policy {
            maps: maps.iter().map(|m| m.name.as_str()).collect(),
            allowed_dirs: &settings.allowed_file_dirs,
        };
        if let Err(violation) = self.check(&chunks, &config, &policy, render) {
            self.last = None;
            return Err(violation.into());
        }
        self.last = Some(Last {
            render,
            view: view.touched.as_ref().map(|t| t.view),
            settings: settings.clone(),
            excluded: !view.excluded.is_empty(),
            chunks,
            len: config.len(),
            placed,
            stale: 0,
        });
        Ok(Rendered {
            config,
            maps,
            render,
            shared,
            patched: false,
        })
    }

    /// Renders `view` from `last`, its previous view rendered, by rendering again the blocks of
    /// the apps and services that changed ([`View::touched`]) and putting them in place of
    /// their chunks. `None` when that cannot be done, and a walk follows: the view does not
    /// follow `last`'s, something beyond items in place changed, a block cannot be kept or is
    /// invoked inside another, an item's output appears, disappears, fails or moves to another
    /// section, too much changed, or enough kept outputs went stale to let them go.
    fn patch(
        &mut self,
        last: &mut Last,
        view: &View,
        settings: &Settings,
        previous: Option<&str>,
    ) -> Option<Rendered> {
        let touched = view.touched.as_deref()?;
        let moved = !touched.arrived.is_empty() || !touched.left.is_empty();
        if touched.reshaped
            || last.view != Some(touched.view.wrapping_sub(1))
            || last.excluded
            || !view.excluded.is_empty()
            || last.settings != *settings
            || touched.apps.len()
                + touched.arrived.len()
                + touched.left.len()
                + touched.services.len()
                > PATCH_MAX
            || last.stale > last.chunks.len() / 8 + PATCH_MAX
            || (moved && self.counts)
        {
            return None;
        }
        // Nothing was moved, and what came or went are pooled apps (whose slots were free or
        // are freed in place): the positions are the last render's but for the apps after
        // those, and of the root only the count of apps may differ.
        let context = context(view, settings, view.apps.len(), view.services.len());
        let root = HbContext::wraps(&context).ok()?;
        let state = self.state.clone();
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        // Apps that came or went change the count of apps in the root, which the blocks that
        // read the root see.
        let recount = moved
            .then(|| root_hash(&context))
            .filter(|hash| *hash != state.root);
        let recounted = recount.is_some();
        state.render += 1;
        let (render, generation) = (state.render, state.generation);
        let mut replaced: Vec<(usize, Arc<str>)> = Vec::new();
        let mut shifted: Vec<(usize, Vec<u32>)> = Vec::new();
        let mut stale = 0;
        for (n, placed) in last.placed.iter().enumerate() {
            let block = state.blocks.get_mut(&placed.block)?;
            if placed.nested || block.deps.never || (recounted && block.deps.root) {
                return None;
            }
            let at = if moved && placed.section == Section::Apps {
                if block.deps.position {
                    return None;
                }
                shifted.push((n, moved_at(view, touched, &placed.at)?));
                &shifted.last()?.1
            } else {
                &placed.at
            };
            let len = at.len();
            for (i, subject, key) in touched_items(view, touched, placed.section)? {
                let at = *at.get(i)?;
                let position = block.deps.position.then_some((i, i == 0, i + 1 == len));
                let generation = block.deps.root.then_some(generation);
                let kept = block
                    .items
                    .get_mut(&key)
                    .filter(|kept| kept.position == position && kept.generation == generation);
                let output = match kept {
                    Some(kept) => {
                        kept.used = render;
                        kept.output.clone().ok()?
                    }
                    None => {
                        let mut rc = RenderContext::new(None);
                        let mut item = BlockContext::new();
                        enter(&mut item, &subject, i, len);
                        rc.push_block(item);
                        let mut out = StringOutput::new();
                        block
                            .template
                            .render(&self.handlebars, &root, &mut rc, &mut out)
                            .ok()?;
                        let output = Arc::<str>::from(out.into_string().ok()?);
                        block.items.insert(
                            key,
                            Kept {
                                _item: subject.holder(),
                                position,
                                generation,
                                output: Ok(output.clone()),
                                used: render,
                            },
                        );
                        stale += 1;
                        output
                    }
                };
                match (at, output.is_empty()) {
                    (EMPTY, true) => {}
                    (EMPTY, false) | (_, true) => return None,
                    (at, false) => {
                        let at = at as usize;
                        if !Arc::ptr_eq(&last.chunks.get(at)?.text, &output) {
                            replaced.push((at, output));
                        }
                    }
                }
            }
        }
        if let Some(hash) = recount {
            state.root = hash;
            state.generation += 1;
        }
        drop(state);
        last.stale += stale;
        let maps = self.maps(view);
        let policy = legate_proto::policy::Policy {
            maps: maps.iter().map(|m| m.name.as_str()).collect(),
            allowed_dirs: &settings.allowed_file_dirs,
        };
        // Each new chunk must pass the policy where its old one stood, and end in the same
        // section; anything else (or a violation, whose line the walk names) takes a walk.
        let mut verdicts = Vec::with_capacity(replaced.len());
        for (at, text) in &replaced {
            let old = &last.chunks[*at].text;
            let checked = self
                .checked
                .get(&(old.as_ptr() as usize))
                .filter(|checked| Arc::ptr_eq(&checked.text, old))?;
            if !text.ends_with('\n') {
                return None;
            }
            let to = legate_proto::policy::check_part(text, checked.from, 0, &policy).ok()?;
            if to != checked.to {
                return None;
            }
            verdicts.push((checked.from, to));
        }
        let (mut first, mut end) = (last.chunks.len(), 0);
        for ((at, text), (from, to)) in replaced.into_iter().zip(verdicts) {
            let old = std::mem::replace(&mut last.chunks[at].text, text.clone());
            self.checked.remove(&(old.as_ptr() as usize));
            self.checked.insert(
                text.as_ptr() as usize,
                Checked {
                    lines: text.matches('\n').count(),
                    text,
                    from,
                    to,
                    used: render,
                },
            );
            (first, end) = (first.min(at), end.max(at + 1));
        }
        for (n, at) in shifted {
            last.placed[n].at = at;
        }
        let length = |chunks: &[Chunk]| chunks.iter().map(|c| c.text.len()).sum::<usize>();
        let span = if first < end {
            Span {
                prefix: length(&last.chunks[..first]),
                suffix: length(&last.chunks[end..]),
            }
        } else {
            Span {
                prefix: length(&last.chunks),
                suffix: 0,
            }
        };
        let config = match previous {
            Some(previous) if previous.len() == last.len => splice(previous, &last.chunks, span),
            _ => concat(&last.chunks, self.last_len),
        };
        self.last_len = config.len();
        let shared = Some((last.render, span));
        (last.render, last.view, last.len) = (render, Some(touched.view), config.len());
        Some(Rendered {
            config,
            maps,
            render,
            shared,
            patched: true,
        })
    }

    /// The policy check of `config`, chunk by chunk, each chunk checked once while it stays in
    /// the output; the whole text at once when chunks do not end at line ends.
    fn check(
        &mut self,
        chunks: &[Chunk],
        config: &str,
        policy: &legate_proto::policy::Policy<'_>,
        render: u64,
    ) -> Result<(), legate_proto::policy::Violation> {
        use legate_proto::policy::check_part;
        if chunks.iter().any(|chunk| !chunk.text.ends_with('\n')) {
            self.checked.clear();
            return legate_proto::policy::check(config, policy);
        }
        let (mut section, mut lines) = ("", 0);
        for chunk in chunks {
            let key = chunk.text.as_ptr() as usize;
            match self.checked.get_mut(&key) {
                Some(checked)
                    if checked.from == section && Arc::ptr_eq(&checked.text, &chunk.text) =>
                {
                    checked.used = render;
                    section = checked.to;
                    lines += checked.lines;
                }
                _ => {
                    let to = match check_part(&chunk.text, section, lines, policy) {
                        Ok(to) => to,
                        Err(violation) => {
                            self.checked.clear();
                            return Err(violation);
                        }
                    };
                    let count = chunk.text.matches('\n').count();
                    self.checked.insert(
                        key,
                        Checked {
                            text: chunk.text.clone(),
                            from: section,
                            to,
                            lines: count,
                            used: render,
                        },
                    );
                    section = to;
                    lines += count;
                }
            }
        }
        self.checked.retain(|_, checked| checked.used == render);
        Ok(())
    }

    /// The map files routing host names to backends, ordered by name: those of the last
    /// render while no domain, backend or exclusion changed since (a server change leaves them).
    fn maps(&mut self, view: &View) -> Vec<v1::ConfigFile> {
        if let (Some(generation), Some((made_for, excluded, maps))) =
            (view.maps_generation, &self.maps)
            && generation == *made_for
            && view.excluded == *excluded
        {
            return maps.clone();
        }
        let mut hosts = String::with_capacity(
            self.maps
                .as_ref()
                .and_then(|(_, _, maps)| maps.iter().map(|m| m.content.len()).max())
                .unwrap_or(0)
                + 64,
        );
        let mut wildcards: Vec<(&str, &str)> = Vec::new();
        for app in view.apps() {
            if app.wildcard {
                wildcards.push((&app.domain[1..], &app.backend));
            } else {
                for piece in [&app.domain, " ", &app.backend, "\n"] {
                    hosts.push_str(piece);
                }
            }
        }
        let maps = model::maps_from(hosts, wildcards);
        self.maps = view
            .maps_generation
            .map(|generation| (generation, view.excluded.clone(), maps.clone()));
        maps
    }
}

/// What two renders' texts share at their start and at their end, from their chunks: the same
/// text (the same kept block, or equal template text) at the same place from either end.
pub fn shared_span(old: &[Chunk], new: &[Chunk]) -> Span {
    let same = |(a, b): &(&Chunk, &Chunk)| Arc::ptr_eq(&a.text, &b.text) || a.text == b.text;
    let front = old.iter().zip(new).take_while(same).count();
    let back = old[front..]
        .iter()
        .rev()
        .zip(new[front..].iter().rev())
        .take_while(same)
        .count();
    let length = |chunks: &[Chunk]| chunks.iter().map(|c| c.text.len()).sum();
    Span {
        prefix: length(&new[..front]),
        suffix: length(&new[new.len() - back..]),
    }
}

/// The context of a render of `view` with `app_count` apps and `service_count` services.
fn context<'a>(
    view: &'a View,
    settings: &'a Settings,
    app_count: usize,
    service_count: usize,
) -> Context<'a> {
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
    Context {
        generator: &settings.generator,
        http_bind: http_bind.join(","),
        http_port: settings.http_port,
        bind_address: bind_addresses.first().cloned().unwrap_or_default(),
        bind_addresses,
        maps: MapNames {
            hosts: HOSTS_MAP,
            wildcards: WILDCARDS_MAP,
        },
        hosts: &view.hosts,
        app_count,
        service_count,
        slot_count: u32::try_from(view.pool.len()).unwrap_or(u32::MAX),
    }
}

/// The items of `section` that `touched` names, each with its position among the section's
/// items and its cache key (as [`Sections::items`] gives them); `None` for one that is gone
/// or not where its slot says.
fn touched_items<'a>(
    view: &'a View,
    touched: &Touched,
    section: Section,
) -> Option<Vec<(usize, Subject<'a>, CacheKey)>> {
    let mut items = Vec::new();
    match section {
        Section::Apps => {
            for domain in touched.apps.iter().chain(&touched.arrived) {
                let app = view.apps.get(domain)?;
                let before = (
                    std::ops::Bound::Unbounded,
                    std::ops::Bound::Excluded(domain.as_str()),
                );
                let position = view.apps.range::<str, _>(before).count();
                items.push((position, Subject::App(app), (Arc::as_ptr(app) as usize, 0)));
            }
        }
        Section::Services => {
            for port in &touched.services {
                let service = view.services.get(port)?;
                let position = view.services.range(..port).count();
                let key = (Arc::as_ptr(service) as usize, 0);
                items.push((position, Subject::Service(service), key));
            }
        }
        Section::Slots => {
            let mut slots = touched.slots.clone();
            for domain in &touched.apps {
                let app = view.apps.get(domain)?;
                if app.slot > 0 {
                    let pooled = view.pool.get(app.slot as usize - 1)?.as_ref()?;
                    if !Arc::ptr_eq(pooled, app) {
                        return None;
                    }
                    slots.insert(app.slot);
                }
            }
            for slot in slots {
                let position = (slot as usize).checked_sub(1)?;
                let app = view.pool.get(position)?.as_ref();
                let key = (
                    slot as usize,
                    app.map_or(0, |app| Arc::as_ptr(app) as usize),
                );
                items.push((position, Subject::Slot(slot, app), key));
            }
        }
    }
    Some(items)
}

/// The chunk of each app's item, from `at`, the last render's, once the pooled apps that came
/// ([`Touched::arrived`]) are put in and those that went ([`Touched::left`]) are taken out:
/// one that came has no chunk yet (its block is rendered with the touched ones), one that
/// went must have had none. `None` when the apps are not what that makes of the last ones.
fn moved_at(view: &View, touched: &Touched, at: &[u32]) -> Option<Vec<u32>> {
    let mut changes: Vec<(&str, bool)> = touched
        .arrived
        .iter()
        .map(|domain| (domain.as_str(), true))
        .chain(touched.left.iter().map(|domain| (domain.as_str(), false)))
        .collect();
    changes.sort_unstable();
    // Changes in domain order: before each, the apps ahead of its domain are those of now, so
    // its position is the number of apps ahead of it now.
    let mut at = at.to_vec();
    let mut apps = view.apps.keys().peekable();
    let mut position = 0;
    for (domain, came) in changes {
        while apps.next_if(|app| app.as_str() < domain).is_some() {
            position += 1;
        }
        let there = apps.peek().is_some_and(|app| *app == domain);
        if came {
            if !there || position > at.len() {
                return None;
            }
            at.insert(position, EMPTY);
        } else {
            if there || *at.get(position)? != EMPTY {
                return None;
            }
            at.remove(position);
        }
    }
    (at.len() == view.apps.len()).then_some(at)
}

/// The changing part of a render's root context ([`CHANGING`]), hashed.
fn root_hash(context: &Context<'_>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        context.hosts,
        context.app_count,
        context.service_count,
        context.slot_count,
    )
        .hash(&mut hasher);
    hasher.finish()
}

/// Whether `template`, outside the blocks of its model helpers, may read how many apps or
/// services there are (a count, the root as a whole, a helper's `{{else}}` for no items, or
/// anything not understood): then an app that comes or goes changes text that only a walk
/// renders.
fn reads_counts(template: &Template) -> bool {
    template.elements.iter().any(element_reads_counts)
}

fn element_reads_counts(element: &TemplateElement) -> bool {
    match element {
        TemplateElement::RawString(_) | TemplateElement::Comment(_) => false,
        TemplateElement::HtmlExpression(h)
        | TemplateElement::Expression(h)
        | TemplateElement::HelperBlock(h) => {
            let section = matches!(&h.name, Parameter::Name(name)
                if SECTIONS.iter().any(|s| s.name() == name));
            std::iter::once(&h.name)
                .chain(&h.params)
                .chain(h.hash.values())
                .any(|parameter| match parameter {
                    Parameter::Literal(_) | Parameter::Path(Path::Local(_)) => false,
                    Parameter::Name(name) => counted(name),
                    Parameter::Path(Path::Relative((_, raw))) => counted(raw),
                    Parameter::Subexpression(sub) => element_reads_counts(&sub.element),
                    _ => true,
                })
                || (!section && h.template.as_ref().is_some_and(reads_counts))
                || (h.inverse.as_ref()).is_some_and(|inverse| section || reads_counts(inverse))
        }
        _ => true,
    }
}

/// Whether a name or path read at the top of a template may be a count of items.
fn counted(path: &str) -> bool {
    let path = path.trim_start_matches("./");
    let field = path.split(['.', '/', '[']).next().unwrap_or_default();
    matches!(
        field,
        "" | "this" | "app_count" | "service_count" | "@root" | ".."
    )
}

/// Makes `block` the context of item `i` of `len`: the item, `@index`, `@first`, `@last`.
fn enter(block: &mut BlockContext<'_>, subject: &Subject<'_>, i: usize, len: usize) {
    block.set_local_var(OWN_BLOCK, to_json(true));
    block.set_base_value(subject.json());
    block.set_local_var("index", to_json(i));
    block.set_local_var("first", to_json(i == 0));
    block.set_local_var("last", to_json(i + 1 == len));
}

/// The text of `chunks`, whose first `span.prefix` and last `span.suffix` bytes are those of
/// `previous`, made of those and of the chunks between.
fn splice(previous: &str, chunks: &[Chunk], span: Span) -> String {
    let mut front = 0;
    let mut first = 0;
    while front < span.prefix && first < chunks.len() {
        front += chunks[first].text.len();
        first += 1;
    }
    let mut back = 0;
    let mut end = chunks.len();
    while back < span.suffix && end > first {
        end -= 1;
        back += chunks[end].text.len();
    }
    let middle = &chunks[first..end];
    let len = span.prefix + middle.iter().map(|c| c.text.len()).sum::<usize>() + span.suffix;
    let mut text = String::with_capacity(len);
    text.push_str(&previous[..span.prefix]);
    for chunk in middle {
        text.push_str(&chunk.text);
    }
    text.push_str(&previous[previous.len() - span.suffix..]);
    text
}

/// The chunks' texts, one after the other.
fn concat(chunks: &[Chunk], hint: usize) -> String {
    let mut config = String::with_capacity(hint.max(chunks.iter().map(|c| c.text.len()).sum()));
    for chunk in chunks {
        config.push_str(&chunk.text);
    }
    config
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
/// lacks, in strict mode) is left out and recorded in the failures, and the others render on:
/// one bad registration must not freeze every later change. A free slot that fails is the
/// template's fault, not an app's: that fails the render.
///
/// Each item's output (unless empty) goes into the invocation's list of chunks, and the top-level output gets
/// one [`MARK`] for the whole invocation; a helper invoked inside an item's block writes
/// straight into that block's output instead.
struct Sections {
    view: View,
    section: Section,
    state: Arc<Mutex<State>>,
}

/// A local variable that marks the helper's own block, to find it again under the blocks that
/// a failed render left pushed.
const OWN_BLOCK: &str = "legate_block";

/// Pops the blocks that a failed render of one item left above the helper's own.
fn unwind_to_mark(rc: &mut RenderContext<'_, '_>) {
    while rc
        .block()
        .is_some_and(|b| b.get_local_var(OWN_BLOCK).is_none())
    {
        rc.pop_block();
    }
}

impl Sections {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The items of this helper, each with its chunk key and its cache key (its address; a
    /// slot's number and its app's address), borrowed from the view: an item whose block is
    /// kept costs no reference count.
    fn items(&self, ordinal: u32) -> Vec<(Subject<'_>, ChunkKey, CacheKey)> {
        let mut items = Vec::new();
        match self.section {
            Section::Apps => {
                for app in self.view.apps() {
                    items.push((
                        Subject::App(app),
                        ChunkKey::App(ordinal),
                        (Arc::as_ptr(app) as usize, 0),
                    ));
                }
            }
            Section::Services => {
                for service in self.view.services() {
                    items.push((
                        Subject::Service(service),
                        ChunkKey::Service(ordinal, service.port as u16),
                        (Arc::as_ptr(service) as usize, 0),
                    ));
                }
            }
            Section::Slots => {
                for (i, app) in self.view.pool.iter().enumerate() {
                    let slot = u32::try_from(i + 1).unwrap_or(u32::MAX);
                    let app = app.as_ref().filter(|app| !self.view.app_excluded(app));
                    items.push((
                        Subject::Slot(slot, app),
                        ChunkKey::Slot(ordinal, slot),
                        (i + 1, app.map_or(0, |app| Arc::as_ptr(app) as usize)),
                    ));
                }
            }
        }
        items
    }
}

/// Where an item's output goes among an invocation's `chunks` so far: at the end, unless it
/// is empty or failed.
fn place(chunks: &[Chunk], output: &Result<Arc<str>, String>) -> u32 {
    match output {
        Ok(text) if !text.is_empty() => u32::try_from(chunks.len()).unwrap_or(EMPTY),
        _ => EMPTY,
    }
}

/// An item a helper renders.
enum Subject<'a> {
    App(&'a Arc<v1::App>),
    Service(&'a Arc<v1::Service>),
    Slot(u32, Option<&'a Arc<v1::App>>),
}

impl Subject<'_> {
    fn json(&self) -> handlebars::JsonValue {
        match self {
            Subject::App(app) => to_json(&***app),
            Subject::Service(service) => to_json(&***service),
            Subject::Slot(slot, app) => to_json(Slot {
                slot: *slot,
                backend: model::slot_backend(*slot),
                free: app.is_none(),
                domain: app.as_ref().map_or("", |app| app.domain.as_str()),
                servers: app.as_ref().map_or(&[], |app| app.servers.as_slice()),
            }),
        }
    }

    /// The app or service whose failure this is.
    fn item(&self) -> Option<Item> {
        match self {
            Subject::App(app) | Subject::Slot(_, Some(app)) => Some(Item::App(app.domain.clone())),
            Subject::Service(service) => Some(Item::Service(service.port as u16)),
            Subject::Slot(_, None) => None,
        }
    }

    fn holder(&self) -> Option<Holder> {
        match self {
            Subject::App(app) | Subject::Slot(_, Some(app)) => Some(Holder::App(Arc::clone(app))),
            Subject::Service(service) => Some(Holder::Service(Arc::clone(service))),
            Subject::Slot(_, None) => None,
        }
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
        let id = std::ptr::from_ref::<Template>(template) as usize;
        let nested = rc
            .block()
            .is_some_and(|b| !b.base_path().is_empty() || b.base_value().is_some());
        // Inside another item's block, or a second time in one render: written straight out,
        // not kept (what it renders depends on where it is).
        let (direct, ordinal, render, generation, deps) = {
            let mut state = self.lock();
            let render = state.render;
            let generation = state.generation;
            let in_item = state.in_item;
            let block = state.blocks.entry(id).or_insert_with(|| Block {
                template: template.clone(),
                deps: Deps::of(template),
                invoked: 0,
                items: AddressMap::default(),
            });
            if block.invoked == render {
                block.deps.never = true;
            }
            if nested {
                // Under `each` or `with`: `../` reaches that block's item, not the root.
                block.deps.root = true;
            }
            block.invoked = render;
            let deps = block.deps;
            let ordinal = u32::try_from(state.invocations.len()).unwrap_or(u32::MAX);
            if !in_item {
                state.invocations.push(Invocation {
                    block: id,
                    section: self.section,
                    nested,
                    chunks: Vec::new(),
                    at: Vec::new(),
                });
            }
            (in_item, ordinal, render, generation, deps)
        };
        if !direct {
            out.write(&MARK.to_string())?;
        }
        let items = self.items(ordinal);
        let len = items.len();
        // This invocation's kept outputs, chunks and failures, handed back to the state at the
        // end (helpers inside an item's block write straight out and touch none of them).
        let mut kept_items = match self.lock().blocks.get_mut(&id) {
            Some(block) if !direct => std::mem::take(&mut block.items),
            _ => AddressMap::default(),
        };
        let mut chunks = Vec::with_capacity(len);
        // Where each item's chunk is (when not direct).
        let mut at = Vec::with_capacity(if direct { 0 } else { len });
        let mut failures = Vec::new();
        // Kept outputs used (or made) by this invocation: when they are all there is, none
        // is stale.
        let mut used = 0;
        let mut block = BlockContext::new();
        block.set_local_var(OWN_BLOCK, to_json(true));
        rc.push_block(block);
        for (i, (item, chunk, key)) in items.into_iter().enumerate() {
            let position = deps.position.then_some((i, i == 0, i + 1 == len));
            let generation = deps.root.then_some(generation);
            let keep = !direct && !deps.never;
            let kept = kept_items
                .get_mut(&key)
                .filter(|kept| keep && kept.position == position && kept.generation == generation);
            if let Some(kept) = kept {
                kept.used = render;
                used += 1;
                at.push(place(&chunks, &kept.output));
                match &kept.output {
                    Ok(text) if text.is_empty() => {}
                    Ok(text) => chunks.push(Chunk {
                        key: chunk,
                        text: text.clone(),
                    }),
                    Err(error) => {
                        if let Some(item) = item.item() {
                            failures.push(ItemFailure {
                                item,
                                error: error.clone(),
                            });
                        }
                    }
                }
                continue;
            }
            if let Some(block) = rc.block_mut() {
                enter(block, &item, i, len);
            }
            self.lock().in_item = true;
            let mut buffer = StringOutput::new();
            let result = template.render(r, ctx, rc, &mut buffer);
            self.lock().in_item = direct;
            let output = match (result, item.item()) {
                (Ok(()), _) => Ok(buffer.into_string()?),
                (Err(e), Some(_)) => {
                    unwind_to_mark(rc);
                    Err(e.to_string())
                }
                (Err(e), None) => {
                    unwind_to_mark(rc);
                    rc.pop_block();
                    return Err(e);
                }
            };
            if direct {
                match output {
                    Ok(text) => out.write(&text)?,
                    Err(error) => {
                        if let Some(item) = item.item() {
                            failures.push(ItemFailure { item, error });
                        }
                    }
                }
                continue;
            }
            let output = output.map(Arc::<str>::from);
            at.push(place(&chunks, &output));
            match &output {
                Ok(text) if text.is_empty() => {}
                Ok(text) => chunks.push(Chunk {
                    key: chunk,
                    text: text.clone(),
                }),
                Err(error) => {
                    if let Some(failed) = item.item() {
                        failures.push(ItemFailure {
                            item: failed,
                            error: error.clone(),
                        });
                    }
                }
            }
            if keep {
                used += 1;
                kept_items.insert(
                    key,
                    Kept {
                        _item: item.holder(),
                        position,
                        generation,
                        output,
                        used: render,
                    },
                );
            }
        }
        if kept_items.len() != used {
            kept_items.retain(|_, kept| kept.used == render);
        }
        let mut state = self.lock();
        state.failures.append(&mut failures);
        if !direct {
            if let Some(block) = state.blocks.get_mut(&id) {
                block.items = kept_items;
            }
            if let Some(invocation) = state.invocations.get_mut(ordinal as usize) {
                invocation.chunks = chunks;
                invocation.at = at;
            }
        }
        drop(state);
        rc.pop_block();
        Ok(())
    }
}
