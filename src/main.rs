//! The `agentid` command.
#![deny(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout},
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use agentid::{admission::register::Endpoint, api::ProtectedResource};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tikv_jemallocator::Jemalloc;

/// jemalloc, in every build: the release image is a static musl binary, whose own allocator is
/// slow, and under glibc's the per-thread arenas held about half the operator's memory at scale
/// (docs/benchmarks.md); one allocator everywhere means the benchmark measures what ships.
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// jemalloc, with what the caches keep (allocations marked by `agentid::alloc::long_lived`) taken
/// from an arena of its own once [`cache_arena`] has made it: what a flood of grants allocated
/// then leaves whole pages behind to give back, not pages a cached object keeps partly used.
struct Allocator;

/// The caches' arena (jemalloc's index), or `NO_ARENA` until it is made.
static CACHE_ARENA: AtomicU32 = AtomicU32::new(NO_ARENA);
const NO_ARENA: u32 = u32::MAX;

impl Allocator {
    /// jemalloc's flags for an allocation aligned to `align` that the caches keep, or None for
    /// any other (made as jemalloc's own allocator makes it). Not from the thread's cache, which
    /// holds regions of either arena (freeing goes through it: a few of the caches' regions are
    /// reused by other allocations, bounded by its size).
    #[inline]
    fn cache_flags(align: usize) -> Option<std::ffi::c_int> {
        use tikv_jemalloc_sys::{MALLOCX_ALIGN, MALLOCX_ARENA, MALLOCX_TCACHE_NONE};
        let arena = CACHE_ARENA.load(Ordering::Relaxed);
        (arena != NO_ARENA && agentid::alloc::is_long_lived())
            .then(|| MALLOCX_ARENA(arena as usize) | MALLOCX_TCACHE_NONE | MALLOCX_ALIGN(align))
    }
}

// SAFETY: every call is jemalloc's: either tikv-jemallocator's (which implements this trait) or
// `mallocx`/`rallocx` with the layout's size and alignment and an arena that exists (a
// reallocation that fits in place stays in the arena it was made in). Freeing is always
// tikv-jemallocator's: jemalloc finds the arena of what it frees.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match Self::cache_flags(layout.align()) {
            // SAFETY: the size is not zero (this trait's contract).
            Some(flags) => unsafe { tikv_jemalloc_sys::mallocx(layout.size(), flags) }.cast(),
            // SAFETY: as called.
            None => unsafe { Jemalloc.alloc(layout) },
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match Self::cache_flags(layout.align()) {
            // SAFETY: as in `alloc`.
            Some(flags) => {
                unsafe { tikv_jemalloc_sys::mallocx(layout.size(), flags | tikv_jemalloc_sys::MALLOCX_ZERO) }.cast()
            }
            // SAFETY: as called.
            None => unsafe { Jemalloc.alloc_zeroed(layout) },
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as called; jemalloc made `ptr`, in whichever arena.
        unsafe { Jemalloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match Self::cache_flags(layout.align()) {
            // SAFETY: `ptr` is jemalloc's and live, `new_size` not zero (this trait's contract).
            Some(flags) => unsafe { tikv_jemalloc_sys::rallocx(ptr.cast(), new_size, flags) }.cast(),
            // SAFETY: as called.
            None => unsafe { Jemalloc.realloc(ptr, layout, new_size) },
        }
    }
}

/// Makes the caches' arena (once; later calls return the same index). None: jemalloc would not
/// make one, and the caches share the default arena.
#[allow(unsafe_code)]
fn cache_arena() -> Option<u32> {
    static MADE: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *MADE.get_or_init(|| {
        // SAFETY: `arenas.create` is an `unsigned`, as read.
        let arena = unsafe { tikv_jemalloc_ctl::raw::read::<u32>(b"arenas.create\0") }.ok()?;
        CACHE_ARENA.store(arena, Ordering::Relaxed);
        Some(arena)
    })
}

/// jemalloc's options, read once when it starts (`_RJEM_MALLOC_CONF` in the environment still
/// overrides them): one arena, not four per core — the operator's threads share its partly used
/// pages instead of each keeping its own — and small objects (up to 1 KiB) on one-page slabs, so
/// that a page is given back as soon as its few objects are freed. After a flood of grants was
/// worked off, the pages the flood left partly used held 40% on top of the live heap; these two
/// cut that by about 40 % at mid size (docs/benchmarks.md).
// jemalloc reads this symbol as a C string: a NUL-terminated byte string, never written.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 30] = b"narenas:1,slab_sizes:1-1024:1\0";

/// agentid: zero standing privilege for AI agents on Kubernetes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML, or write one file per kind.
    Crd {
        /// Write `<plural>.agentid.dev.yaml` files into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Run the operator and its admission webhook against the cluster of the current kubeconfig
    /// (or the in-cluster config).
    Run(Box<RunArgs>),
}

#[derive(Args)]
struct RunArgs {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "AGENTID_METRICS_ADDR")]
    metrics_addr: SocketAddr,
    /// The apiserver URL written into issued kubeconfigs [default: the URL agentid itself uses].
    #[arg(long, env = "AGENTID_API_SERVER_URL")]
    api_server_url: Option<String>,
    /// PEM file with the CA that issued kubeconfigs trust [default: the CA agentid itself trusts].
    #[arg(long, env = "AGENTID_API_SERVER_CA_FILE")]
    api_server_ca_file: Option<PathBuf>,
    /// A resource every grant needs approval for, whatever the verb: `GROUP/RESOURCE[/NAME]`
    /// (the core group is empty, e.g. `/configmaps/feature-flags`). Repeatable.
    #[arg(long = "protected-resource", value_name = "GROUP/RESOURCE[/NAME]")]
    protected_resources: Vec<String>,
    /// Address the admission webhook (HTTPS) listens on.
    #[arg(long, default_value = "0.0.0.0:9443", env = "AGENTID_WEBHOOK_ADDR")]
    webhook_addr: SocketAddr,
    /// Register the webhook with this URL, for an operator outside the cluster
    /// (e.g. `https://127.0.0.1:9443`).
    #[arg(long, env = "AGENTID_WEBHOOK_URL", conflicts_with = "webhook_service")]
    webhook_url: Option<String>,
    /// Register the webhook behind this Service: `NAMESPACE/NAME[:PORT]` (port 443 by default).
    #[arg(long, env = "AGENTID_WEBHOOK_SERVICE")]
    webhook_service: Option<String>,
    /// Keep the webhook's CA and certificate in this Secret (`NAMESPACE/NAME`), shared by restarts
    /// and replicas and renewed a month before expiry [default: a new one each start].
    #[arg(long, env = "AGENTID_WEBHOOK_CERT_SECRET")]
    webhook_cert_secret: Option<String>,
    /// The certificate in --webhook-cert-secret is issued by someone else (cert-manager): read
    /// `tls.crt`/`tls.key` from it, reload on change, and leave the webhooks' caBundle to the CA
    /// injector.
    #[arg(long, env = "AGENTID_WEBHOOK_CERT_EXTERNAL", requires = "webhook_cert_secret")]
    webhook_cert_external: bool,
    /// Namespaces whose AgentIdentities this installation serves (comma-separated) [default: all].
    /// Identities elsewhere are refused by admission and marked Stalled.
    #[arg(long, env = "AGENTID_AGENT_NAMESPACES", value_delimiter = ',')]
    agent_namespaces: Vec<String>,
    /// Namespaces grants may act in (comma-separated) [default: all]. The chart confines the
    /// operator's RBAC to these; identities may not allow any other namespace.
    #[arg(long, env = "AGENTID_TARGET_NAMESPACES", value_delimiter = ',')]
    target_namespaces: Vec<String>,
    /// Elect a leader among replicas with a Lease in this namespace [default: $POD_NAMESPACE]:
    /// every replica serves the webhook, only the leader reconciles.
    #[arg(long, env = "AGENTID_LEADER_ELECTION")]
    leader_election: bool,
    /// The leader Lease's namespace [default: $POD_NAMESPACE].
    #[arg(long, env = "AGENTID_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// The most grants one identity may hold at once; more are Rejected (TooManyActiveGrants).
    /// All of an identity's credentials share one Secret (1 MiB), which holds about 300.
    #[arg(long, env = "AGENTID_MAX_ACTIVE_GRANTS_PER_IDENTITY", default_value_t = agentid::policy::capacity::DEFAULT_MAX_ACTIVE_GRANTS as u16,
          value_parser = clap::value_parser!(u16).range(1..=agentid::policy::capacity::MAX_ACTIVE_GRANTS_LIMIT as i64))]
    max_active_grants_per_identity: u16,
    /// How many grants are reconciled at once. Each holds a few apiserver requests in flight; an
    /// unbounded flood of new grants opened thousands of connections and starved the webhook.
    #[arg(long, env = "AGENTID_GRANT_WORKERS", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    grant_workers: u16,
    /// Talk to the apiserver over HTTP/2 when it offers it (all requests and watches on one
    /// connection); `false`: HTTP/1.1, a connection per request in flight.
    #[arg(long, env = "AGENTID_API_HTTP2", default_value_t = true, action = clap::ArgAction::Set)]
    api_http2: bool,
    /// Exit when standard input closes: lets a test harness tie the operator to its lifetime.
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd { out_dir } => crd(out_dir),
        Command::Run(args) => {
            if args.exit_on_stdin_eof {
                std::thread::spawn(|| {
                    // Reads until EOF (or an error): the parent is gone, and so is the reason to run.
                    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                    std::process::exit(0);
                });
            }
            tokio::runtime::Runtime::new()?.block_on(run(*args))
        }
    }
}

/// Lets jemalloc return freed memory to the system from its background threads, and has the
/// metrics report its counts. Without background threads it purges only when the same arena
/// allocates again: after a flood of grants was worked off, an operator gone quiet kept the
/// flood's high-water mark resident (docs/benchmarks.md). Best effort: without them the
/// operator works the same.
fn set_up_allocator() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "jemalloc background threads unavailable; freed memory is returned more slowly");
    }
    if cache_arena().is_none() {
        tracing::warn!("jemalloc made no arena for the caches; they share the default one");
    }
    agentid::metrics::read_heap_with(heap_stats);
}

/// jemalloc's own counts (refreshed by advancing its epoch), for the heap gauges in /metrics.
fn heap_stats() -> Option<agentid::metrics::HeapStats> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    Some(agentid::metrics::HeapStats {
        allocated: tikv_jemalloc_ctl::stats::allocated::read().ok()? as u64,
        active: tikv_jemalloc_ctl::stats::active::read().ok()? as u64,
        resident: tikv_jemalloc_ctl::stats::resident::read().ok()? as u64,
        caches: cache_arena().and_then(arena_allocated).unwrap_or(0),
        caches_active: cache_arena().and_then(arena_active).unwrap_or(0),
    })
}

/// The bytes of arena `arena`'s pages in use (as of the last epoch).
fn arena_active(arena: u32) -> Option<u64> {
    let pages = read_size(&format!("stats.arenas.{arena}.pactive"))?;
    Some((pages * read_size("arenas.page")?) as u64)
}

/// The bytes in live allocations of arena `arena`, small and large (as of the last epoch).
fn arena_allocated(arena: u32) -> Option<u64> {
    let read = |class: &str| read_size(&format!("stats.arenas.{arena}.{class}.allocated"));
    Some((read("small")? + read("large")?) as u64)
}

/// The jemalloc key `name`, one of its `size_t` ones.
#[allow(unsafe_code)]
fn read_size(name: &str) -> Option<usize> {
    let name = format!("{name}\0");
    // SAFETY: the callers' keys are `size_t`, as read; the name is NUL-terminated.
    unsafe { tikv_jemalloc_ctl::raw::read::<usize>(name.as_bytes()) }.ok()
}

fn crd(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    for crd in agentid::api::crds() {
        let yaml = agentid::api::crd_yaml(&crd)?;
        match &out_dir {
            Some(dir) => {
                let path = dir.join(agentid::api::crd_file_name(&crd));
                std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
            }
            None => stdout.write_all(yaml.as_bytes())?,
        }
    }
    Ok(())
}

/// Parses `GROUP/RESOURCE[/NAME]`.
fn parse_protected(text: &str) -> anyhow::Result<ProtectedResource> {
    let parts: Vec<&str> = text.split('/').collect();
    let (group, resource, name) = match parts.as_slice() {
        [group, resource] => (*group, *resource, None),
        [group, resource, name] => (*group, *resource, Some(*name)),
        _ => anyhow::bail!(
            "--protected-resource {text:?}: expected GROUP/RESOURCE[/NAME], e.g. apps/deployments/payments or /configmaps/flags"
        ),
    };
    anyhow::ensure!(!resource.is_empty(), "--protected-resource {text:?}: the resource is empty");
    Ok(ProtectedResource {
        api_group: group.into(),
        resource: resource.into(),
        resource_names: name.map(|n| vec![n.to_string()]).unwrap_or_default(),
        namespaces: vec![],
    })
}

/// Parses `NAMESPACE/NAME[:PORT]`.
fn parse_service(text: &str) -> anyhow::Result<Endpoint> {
    let (namespace, rest) = text.split_once('/').context("--webhook-service: expected NAMESPACE/NAME[:PORT]")?;
    let (name, port) = match rest.split_once(':') {
        Some((name, port)) => (name, port.parse().context("--webhook-service: the port is not a number")?),
        None => (rest, 443),
    };
    Ok(Endpoint::Service { namespace: namespace.into(), name: name.into(), port })
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    set_up_allocator();
    let protected = args.protected_resources.iter().map(|p| parse_protected(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let webhook_endpoint = match (&args.webhook_url, &args.webhook_service) {
        (Some(url), _) => Some(Endpoint::Url(url.clone())),
        (None, Some(service)) => Some(parse_service(service)?),
        (None, None) => None,
    };
    let config = kube::Config::infer().await.context("loading kubeconfig or in-cluster config")?;
    let server =
        args.api_server_url.unwrap_or_else(|| config.cluster_url.to_string().trim_end_matches('/').to_string());
    let ca_pem = match args.api_server_ca_file {
        Some(path) => std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
        None => agentid::credentials::pem_certificates(config.root_cert.as_deref().unwrap_or_default()),
    };
    anyhow::ensure!(
        !ca_pem.is_empty(),
        "no CA for issued kubeconfigs: the current config trusts system roots; pass --api-server-ca-file"
    );
    let client = agentid::client::build(config, args.api_http2)?;
    let clean = |list: Vec<String>| -> Vec<String> {
        list.into_iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect()
    };
    let installation = agentid::policy::install::Installation {
        agent_namespaces: clean(args.agent_namespaces),
        target_namespaces: clean(args.target_namespaces),
    };
    let leader_election = if args.leader_election {
        let namespace = args
            .leader_election_namespace
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .context("--leader-election needs --leader-election-namespace or $POD_NAMESPACE")?;
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        Some(agentid::controller::LeaderElection { namespace, identity })
    } else {
        None
    };
    let settings = agentid::controller::Settings {
        leader_election,
        max_active_grants: usize::from(args.max_active_grants_per_identity),
        grant_workers: args.grant_workers,
        installation: installation.clone(),
        metrics_addr: args.metrics_addr,
        access: agentid::policy::desired::ClusterAccess { server, ca_pem },
        protected,
        webhook: agentid::admission::server::WebhookSettings {
            addr: args.webhook_addr,
            endpoint: webhook_endpoint,
            cert_secret: args
                .webhook_cert_secret
                .as_deref()
                .map(|s| {
                    s.split_once('/')
                        .map(|(ns, name)| (ns.to_string(), name.to_string()))
                        .context("--webhook-cert-secret: expected NAMESPACE/NAME")
                })
                .transpose()?,
            cert_external: args.webhook_cert_external,
            own_namespace: std::env::var("POD_NAMESPACE").ok(),
            installation,
        },
    };
    agentid::controller::run(client, settings).await
}

#[cfg(test)]
mod tests {
    /// `arenas.bin.<bin>.<what>` (`size` or `slab_size`), as jemalloc reports it.
    fn bin(bin: u32, what: &str) -> usize {
        let name = format!("arenas.bin.{bin}.{what}");
        super::read_size(&name).expect(&name)
    }

    /// The arena jemalloc made `ptr` in (`arenas.lookup`).
    #[allow(unsafe_code)]
    fn arena_of<T: ?Sized>(ptr: *const T) -> u32 {
        let mut arena: u32 = u32::MAX;
        let mut len = std::mem::size_of::<u32>();
        let mut ptr = ptr.cast::<std::ffi::c_void>();
        // SAFETY: `arenas.lookup` takes a pointer and gives an `unsigned`, as passed; the name is
        // NUL-terminated.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"arenas.lookup".as_ptr(),
                (&raw mut arena).cast(),
                &mut len,
                (&raw mut ptr).cast(),
                std::mem::size_of::<*const std::ffi::c_void>(),
            )
        };
        assert_eq!(rc, 0, "arenas.lookup");
        arena
    }

    #[test]
    fn what_the_caches_keep_comes_from_their_own_arena() {
        let arena = super::cache_arena().expect("jemalloc makes an arena");
        assert_eq!(super::cache_arena(), Some(arena), "made once");
        let before = Box::new([1u8; 48]);
        // A large block freed dirty in the arena, for the zeroed one to be made in its place.
        drop(agentid::alloc::long_lived(|| vec![0xAAu8; 1 << 20]));
        let zeroed = agentid::alloc::long_lived(|| vec![0u8; 1 << 20]);
        let (small, grown, string) = agentid::alloc::long_lived(|| {
            let mut grown = Vec::with_capacity(1);
            grown.extend(0..100_000u32);
            (Box::new([1u8; 48]), grown, "a cached name".to_string())
        });
        let after = Box::new([1u8; 48]);
        assert_eq!(arena_of(&*small), arena, "a small object");
        assert_eq!(arena_of(zeroed.as_ptr()), arena, "a large zeroed one");
        assert!(zeroed.iter().all(|&b| b == 0));
        assert_eq!(arena_of(grown.as_ptr()), arena, "one grown by reallocation");
        assert_eq!(
            grown.iter().map(|&n| u64::from(n)).sum::<u64>(),
            99_999 * 100_000 / 2,
            "its contents moved with it"
        );
        assert_eq!(arena_of(string.as_ptr()), arena);
        assert_ne!(arena_of(&*before), arena, "nothing before");
        assert_ne!(arena_of(&*after), arena, "nor after");
        tikv_jemalloc_ctl::epoch::advance().expect("epoch");
        let counted = super::arena_allocated(arena).expect("the arena's count");
        assert!(counted >= (1 << 20) + 400_000, "the arena counts what it holds: {counted}");
        // Freed through the ordinary path, then made again in the same arena.
        drop((small, zeroed, grown, string));
        let again = agentid::alloc::long_lived(|| Box::new([2u8; 48]));
        assert_eq!(arena_of(&*again), arena);
    }

    #[test]
    #[allow(unsafe_code)]
    fn jemalloc_starts_with_the_compiled_in_options() {
        // The environment may override them; otherwise the symbol's name was found. Both options
        // differ from jemalloc's defaults on any machine: one arena is also the default on one
        // CPU, but small size classes' slabs are several pages by default (80 bytes: five).
        if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
            return;
        }
        assert_eq!(tikv_jemalloc_ctl::opt::narenas::read().ok(), Some(1));
        // SAFETY: `arenas.nbins` is an `unsigned`, `arenas.page` a `size_t`, as read.
        let (bins, page) = unsafe {
            (
                tikv_jemalloc_ctl::raw::read::<u32>(b"arenas.nbins\0").expect("nbins"),
                tikv_jemalloc_ctl::raw::read::<usize>(b"arenas.page\0").expect("page"),
            )
        };
        let small: Vec<u32> = (0..bins).filter(|&b| bin(b, "size") <= 1024).collect();
        assert!(small.len() > 10, "jemalloc's size classes up to 1 KiB: {small:?}");
        for b in small {
            assert_eq!(bin(b, "slab_size"), page, "the slab of the {}-byte class is one page", bin(b, "size"));
        }
    }
}
