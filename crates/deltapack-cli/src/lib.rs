//! `deltapack`: the command-line front end. Parsing, progress and printing only; the work
//! is done by the `deltapack` library.
//!
//! A library with one entry point, [`main`], so that the Python wheel can put the same CLI on
//! the PATH (its `deltapack` console script calls [`main`] with its `sys.argv`); the binary
//! `src/main.rs` calls it with the process's arguments.

/// `println!` that ends the program quietly when stdout is a closed pipe (`deltapack inspect
/// x.dpk | head`) instead of panicking; any other failure to write is an I/O error (exit 5).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: writing to stdout: {e}");
            std::process::exit(5);
        }
    }};
}

mod additive;
mod bounds;
mod demo;
mod progress;
mod report;
mod store;
mod sweep;
mod synth;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use deltapack::checkpoint::hub;
use deltapack::ErrorKind;

/// Store fine-tuned models as compact deltas against their base, and rebuild them bit for bit.
///
/// Exit status: 0 success; 1 internal error; 2 bad input or usage (including an existing
/// output without --force); 3 wrong base; 4 corrupt or unsupported delta; 5 I/O error
/// (missing file, disk full); 6 verification found a difference from --finetuned.
#[derive(Parser)]
#[command(name = "deltapack", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Worker threads (default: all cores). Output bytes do not depend on it.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars or progress lines.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Show per-tensor tables where a command has them (as `--tensors` does).
    #[arg(long, short, global = true)]
    verbose: bool,
    /// Endpoint of the S3-compatible server for s3:// URLs (default: AWS_ENDPOINT_URL, else
    /// AWS itself), e.g. http://127.0.0.1:9000; requests are path-style.
    #[arg(long, global = true, value_name = "URL")]
    endpoint: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Make a delta of a fine-tune against its base.
    Make {
        /// Base checkpoint: a model directory, a .safetensors file, or ORG/NAME[@REVISION] in
        /// the local Hugging Face cache (then recorded as --base-id).
        #[arg(long, value_parser = crate::location)]
        base: PathBuf,
        /// Fine-tuned checkpoint: a model directory, a .safetensors file, or ORG/NAME[@REVISION].
        #[arg(long, value_parser = crate::location)]
        finetuned: PathBuf,
        /// Output delta file (.dpk): a path, or an s3:// or file:// URL (uploaded as it is
        /// written, visible only once complete).
        #[arg(short, long, value_parser = crate::location)]
        output: PathBuf,
        /// Code against the model this chain of deltas rebuilds (repeat, in order from the
        /// base) instead of the base: the new delta continues the last one. A lossy child is
        /// coded against its parent's reconstruction, so errors do not add up.
        #[arg(long = "parent", value_name = "DELTA", value_parser = crate::location)]
        parents: Vec<PathBuf>,
        /// Where the base comes from, e.g. ORG/NAME@REVISION; shown by `inspect`.
        #[arg(long)]
        base_id: Option<String>,
        /// Bytes of tensor per chunk, a power of two (the unit of parallel work).
        #[arg(long, default_value_t = 1 << 21)]
        chunk_bytes: usize,
        /// Overwrite an existing output.
        #[arg(long)]
        force: bool,
        /// fsync the output before it is renamed into place.
        #[arg(long)]
        sync: bool,
        /// Store configs and tokenizers whole instead of against the base's files, so that
        /// applying needs only the base's tensors (shard headers never depend on the base).
        #[arg(long)]
        self_contained: bool,
        /// Print every tensor's codec, size and error (lossy deltas; by default a summary).
        #[arg(long)]
        tensors: bool,
        #[command(flatten)]
        codec: CodecArgs,
    },
    /// Rebuild the fine-tune from its base and a delta (or a chain of deltas, in order from
    /// the base, rebuilt in one pass) into a directory.
    Apply {
        /// Base checkpoint the (first) delta was made from.
        #[arg(long, value_parser = crate::location)]
        base: PathBuf,
        /// The delta file, or the chain of delta files from the base; or a FastChat-style
        /// additive delta (a model directory of fine-tune minus base tensors, recognised as one
        /// or named so by --additive), which is added to the base in fp16 as FastChat does.
        #[arg(required = true, value_name = "DELTA", value_parser = crate::location)]
        deltas: Vec<PathBuf>,
        /// Output directory.
        #[arg(short, long, value_parser = crate::local_path)]
        output: PathBuf,
        /// Replace an existing output directory.
        #[arg(long)]
        force: bool,
        /// fsync every file before the directory is renamed into place.
        #[arg(long)]
        sync: bool,
        /// Additive deltas only: dtype of the float tensors written (default f16, as FastChat).
        #[arg(long, value_enum)]
        dtype: Option<additive::OutDtype>,
        /// Take DELTA (a directory or .safetensors file) for an additive delta without judging
        /// it. Without the flag, a directory is applied additively only when it carries the
        /// marker `export --format additive` writes, or its tensors are small against the
        /// base's; one that looks like a model is refused.
        #[arg(long)]
        additive: bool,
    },
    /// Import a deltatensors .wdelta file (format version 1, as deltatensors 0.2.0 writes)
    /// as an exact delta against the same base.
    ///
    /// The fine-tune is rebuilt as deltatensors' loader rebuilds it (base as float32 plus the
    /// float32 delta), stored in each base tensor's dtype (bf16/f16 rounded to nearest-even),
    /// since a .wdelta does not record the fine-tune's; other base tensors and files are kept.
    Import {
        /// The .wdelta file.
        #[arg(value_parser = crate::local_path)]
        wdelta: PathBuf,
        /// Base checkpoint the .wdelta was made from: a model directory, a .safetensors file,
        /// or ORG/NAME[@REVISION] in the local Hugging Face cache.
        #[arg(long, value_parser = crate::location)]
        base: PathBuf,
        /// Output delta file (.dpk).
        #[arg(short, long, value_parser = crate::location)]
        output: PathBuf,
        /// Where the base comes from, e.g. ORG/NAME@REVISION; shown by `inspect`.
        #[arg(long)]
        base_id: Option<String>,
        /// Overwrite an existing output.
        #[arg(long)]
        force: bool,
        /// fsync the output before it is renamed into place.
        #[arg(long)]
        sync: bool,
        /// Do not check the base against the SHA-256 the .wdelta records (deltatensors hashes
        /// the arrays it was given, in whatever form); only for a base known to be right.
        #[arg(long)]
        no_base_check: bool,
    },
    /// Show what a delta holds (reads only its index).
    Inspect {
        /// The delta file (a path, or an s3:// or file:// URL).
        #[arg(value_parser = crate::location)]
        delta: PathBuf,
        /// List every tensor.
        #[arg(long)]
        tensors: bool,
    },
    /// Check that a delta (or chain) rebuilds its fine-tune from this base, without writing anything.
    Verify {
        /// Base checkpoint.
        #[arg(long, value_parser = crate::location)]
        base: PathBuf,
        /// The delta file, or the chain of delta files from the base.
        #[arg(required = true, value_name = "DELTA", value_parser = crate::location)]
        deltas: Vec<PathBuf>,
        /// Also compare every rebuilt byte with this fine-tune.
        #[arg(long, value_parser = crate::location)]
        finetuned: Option<PathBuf>,
        /// Print every lossy tensor's recorded and measured error (by default a summary).
        #[arg(long)]
        tensors: bool,
    },
    /// Turn a chain of deltas into one delta against the base that rebuilds the same model
    /// (byte for byte; the new delta is exact).
    Squash {
        /// Base checkpoint of the chain.
        #[arg(long, value_parser = crate::location)]
        base: PathBuf,
        /// The chain, in order from the base.
        #[arg(required = true, value_name = "DELTA", value_parser = crate::location)]
        deltas: Vec<PathBuf>,
        /// Output delta file.
        #[arg(short, long, value_parser = crate::location)]
        output: PathBuf,
        /// Overwrite an existing output.
        #[arg(long)]
        force: bool,
    },
    /// Re-code the model a delta (or chain) rebuilds as an exact delta against another base.
    Rebase {
        /// Base checkpoint the delta was made from.
        #[arg(long, value_parser = crate::location)]
        base: PathBuf,
        /// The new base.
        #[arg(long, value_parser = crate::location)]
        onto: PathBuf,
        /// The delta, or chain in order from the base.
        #[arg(required = true, value_name = "DELTA", value_parser = crate::location)]
        deltas: Vec<PathBuf>,
        /// Output delta file.
        #[arg(short, long, value_parser = crate::location)]
        output: PathBuf,
        /// Where the new base comes from (ORG/NAME@REVISION).
        #[arg(long)]
        base_id: Option<String>,
        /// Overwrite an existing output.
        #[arg(long)]
        force: bool,
    },
    /// A store: one or more bases and many named deltas, chained (see `store --help`).
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Run a grid of codecs and settings on one pair; write DIR/sweep.csv and DIR/sweep.svg
    /// (a rate-distortion plot with the Gaussian bound drawn in).
    Sweep {
        /// Base checkpoint.
        #[arg(long, value_parser = crate::location)]
        base: PathBuf,
        /// Fine-tuned checkpoint.
        #[arg(long, value_parser = crate::location)]
        finetuned: PathBuf,
        /// Output directory (created if missing; may hold other files).
        #[arg(short, long, value_parser = crate::local_path)]
        output: PathBuf,
        /// Also keep each delta as DIR/<codec>-<setting>.dpk.
        #[arg(long)]
        keep_deltas: bool,
        /// Replace existing sweep.csv, sweep.svg (and kept deltas) in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Write the fine-tune a delta rebuilds as another kind of delta: `--format additive` is
    /// FastChat's, a model directory of fine-tune minus base tensors in fp16.
    Export {
        /// Output format.
        #[arg(long, value_enum)]
        format: additive::Format,
        /// Base checkpoint the (first) delta was made from.
        #[arg(long, value_parser = crate::location)]
        base: PathBuf,
        /// The delta file, or the chain of delta files from the base.
        #[arg(required = true, value_name = "DELTA", value_parser = crate::location)]
        deltas: Vec<PathBuf>,
        /// Output directory.
        #[arg(short, long, value_parser = crate::local_path)]
        output: PathBuf,
        /// Replace an existing output directory.
        #[arg(long)]
        force: bool,
        /// fsync every file before the directory is renamed into place.
        #[arg(long)]
        sync: bool,
    },
    /// Make a small realistic base and fine-tune, then run make, inspect, apply and verify on them.
    Demo {
        /// Working directory (default: a temporary one, removed afterwards).
        #[arg(long, value_parser = crate::local_path)]
        dir: Option<PathBuf>,
    },
    /// Developer tools for benchmarks.
    #[command(hide = true, subcommand)]
    Dev(Dev),
}

/// Codec choice of `make`.
#[derive(Args, Clone, Default)]
pub struct CodecArgs {
    /// Codec: exact (default), quant, sparse, dare, sign, sign-axis or auto, optionally with
    /// settings as NAME:key=value,... (e.g. quant:bits=3,group=64,domain=value). dare keeps
    /// the delta only in expectation, not within an error: it takes no --max-error.
    #[arg(long, default_value = "exact")]
    codec: String,
    /// quant: bits per code (2..8), with one step per group of 128 values.
    #[arg(long)]
    bits: Option<u8>,
    /// quant: one absolute step per tensor; sparse: quantize the kept values with this step.
    #[arg(long)]
    step: Option<f64>,
    /// sparse, dare: fraction of the changes to keep (default 0.1).
    #[arg(long)]
    keep: Option<f64>,
    /// dare: seed of the random masks (each tensor's mask also depends on its name).
    #[arg(long)]
    seed: Option<u64>,
    /// Largest relative RMS error of each tensor's delta, ||D'-D||/||D||: the codec's cheapest
    /// setting within it is chosen per tensor (a tensor no setting fits is stored exactly).
    /// Not for dare, which keeps the delta only in expectation.
    #[arg(long)]
    max_error: Option<f64>,
    /// Codec for the tensors matching a glob: 'GLOB=NAME[:key=value,...]'; repeatable, the
    /// first match wins. 1-D tensors (norms, biases) stay exact unless a rule names them.
    #[arg(long = "tensor-codec", value_name = "GLOB=SPEC")]
    tensor_codec: Vec<String>,
    /// sign-axis: safetensors file of mean squared input activations per linear weight
    /// (weight name -> 1-D vector over its columns) to weight the fit; see docs/CODECS.md.
    #[arg(long, value_parser = crate::local_path)]
    calibration: Option<PathBuf>,
}

/// A usage error: exit code 2, like the library's invalid arguments.
fn usage(msg: impl Into<String>) -> anyhow::Error {
    deltapack::Error::InvalidArgument(msg.into()).into()
}

impl CodecArgs {
    /// The codec policy these flags describe.
    pub fn policy(&self) -> Result<deltapack::tune::CodecPolicy> {
        use deltapack::tune::CodecSpec;
        let mut spec: CodecSpec = self.codec.parse().map_err(|e| usage(format!("--codec: {e}")))?;
        let settings = [
            ("bits", self.bits.map(|b| b.to_string())),
            ("step", self.step.map(|b| b.to_string())),
            ("keep", self.keep.map(|b| b.to_string())),
            ("seed", self.seed.map(|b| b.to_string())),
        ];
        for (k, v) in settings {
            if let Some(v) = v {
                spec.set(k, &v).map_err(|e| usage(format!("--{k}: {e}")))?;
            }
        }
        if let Some(e) = self.max_error {
            if !(e.is_finite() && e > 0.0) {
                return Err(usage("--max-error must be a positive number"));
            }
            if !spec.takes_budget() {
                return Err(usage(
                    "--max-error does not apply to dare: it preserves the delta only in expectation",
                ));
            }
        }
        if self.max_error.is_none() && spec == CodecSpec::Auto {
            return Err(usage("--codec auto needs --max-error"));
        }
        let rules: Vec<deltapack::tune::TensorRule> = self
            .tensor_codec
            .iter()
            .map(|r| r.parse().map_err(|e| usage(format!("--tensor-codec: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        let any_lossy = spec != CodecSpec::Exact || rules.iter().any(|r| r.spec != CodecSpec::Exact);
        if self.max_error.is_some() && !any_lossy {
            return Err(usage(
                "--max-error bounds the error of lossy codecs, but every tensor is stored exactly (error 0) with --codec exact, the default; choose a lossy one, e.g. --codec auto --max-error 0.1",
            ));
        }
        let calibration = self
            .calibration
            .as_deref()
            .map(deltapack::tune::Calibration::open)
            .transpose()?;
        Ok(deltapack::tune::CodecPolicy {
            default: spec,
            rules,
            max_error: self.max_error,
            calibration,
            ..Default::default()
        })
    }
}

#[derive(Subcommand)]
enum Dev {
    /// Write a synthetic pair as DIR/base and DIR/finetuned.
    Synth {
        /// `reference` (Qwen2.5-0.5B shapes, about 1 GB each) or `demo`.
        #[arg(long, default_value = "reference")]
        preset: String,
        /// Shards of each model (more than one: with a model.safetensors.index.json).
        #[arg(long, default_value_t = 1)]
        shards: usize,
        /// Output directory.
        #[arg(value_parser = crate::local_path)]
        dir: PathBuf,
    },
    /// Print the order-0 entropy bounds of a pair's deltas.
    Bounds {
        #[arg(long, value_parser = crate::location)]
        base: PathBuf,
        #[arg(long, value_parser = crate::location)]
        finetuned: PathBuf,
    },
}

/// Runs the CLI on `args` (the program name first, as `std::env::args_os` gives them) and
/// returns its exit status; it may also end the process itself (Ctrl-C, a closed stdout).
pub fn main(args: Vec<std::ffi::OsString>) -> u8 {
    tune_allocator();
    let json_out = args.iter().any(|a| a == "--json");
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help and --version
        Err(e) => {
            if json_out {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                print_error_json(first.trim_start_matches("error: "), "usage", 2, None);
            }
            e.exit()
        }
    };
    if let Err(e) = ctrlc::set_handler(on_signal) {
        eprintln!("warning: cannot watch for Ctrl-C ({e}); an interrupted run may leave temporary files");
    }
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            let code = exit_code(&e);
            let msg = message(&e);
            let hint = hint(&e);
            eprintln!("error: {msg}");
            if let Some(h) = hint {
                eprintln!("hint: {h}");
            }
            if json_out {
                print_error_json(&msg, kind_name(&e), code, hint);
            }
            code
        }
    }
}

/// What to type next, for the errors a flag answers. The library's messages name no flags
/// (the same errors reach Python, where keyword arguments answer them), so the CLI adds them.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    use deltapack::Error;
    match e.chain().find_map(|c| c.downcast_ref::<Error>())? {
        Error::OutputExists { .. } => Some("pass --force to replace it"),
        Error::WrongParentHash { .. } => Some("pass --no-base-check only if you are sure this is the right base"),
        Error::MissingBaseFiles { .. } => {
            Some("`deltapack make --self-contained` makes a delta that needs only the base's tensors")
        }
        Error::WrongBase { expected, .. } if expected.swapped => {
            Some("check the order: --base takes the base, the fine-tune goes to `make --finetuned`")
        }
        Error::InvalidArgument(m) if m.contains("reparenting them") => {
            Some("`deltapack store rm --reparent` re-codes them against its parent")
        }
        Error::InvalidArgument(m) if m.contains("give the base a name") => Some("pass --name"),
        _ => None,
    }
}

/// SIGINT, SIGTERM or SIGHUP: remove what the command was writing, then exit as shells
/// expect of a process ended by Ctrl-C.
fn on_signal() {
    deltapack::checkpoint::remove_temporaries();
    eprintln!("interrupted; nothing was written");
    std::process::exit(130);
}

/// The error as one line: the contexts and causes, each said once. A library error that
/// already quotes its cause (an I/O error's OS message) is not followed by it again.
fn message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if msg.ends_with(&c) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&c);
    }
    msg
}

/// With `--json`, a failure is a JSON document on stdout too, so scripts parse one thing.
fn print_error_json(msg: &str, kind: &str, exit_code: u8, hint: Option<&str>) {
    let v = serde_json::json!({"error": msg, "kind": kind, "exit_code": exit_code, "hint": hint});
    out!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

/// Keeps freed chunk buffers in glibc's heap for reuse. Every decoded chunk is a buffer of
/// up to a few MiB, allocated and freed on a worker thread; by default glibc may map and
/// unmap such buffers, or trim the thread's heap, each time, so chunks pay page faults to
/// zero fresh pages and cross-core TLB flushes. On a chain of five deltas that was 12 % of
/// `store get` (`perf`), and 7 % of `apply`. Both thresholds are fixed by this: the mmap one
/// at glibc's own ceiling for its adaptive value (32 MiB), since a lower one (4 MiB was
/// tried) sends the lossy codecs' larger per-tensor buffers back to mmap on every use (system
/// time of a `quant` make went from 0.4 to 2.3 s).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only sets two of glibc's allocation thresholds, under glibc's own
    // lock (so also in the Python console script, whose interpreter may have threads); a
    // rejected value leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// The library's error class behind `e`, if any.
fn error_kind(e: &anyhow::Error) -> Option<ErrorKind> {
    e.chain()
        .find_map(|c| c.downcast_ref::<deltapack::Error>())
        .map(|e| e.kind())
}

/// The documented exit code of an error (see the command's long help).
fn exit_code(e: &anyhow::Error) -> u8 {
    match error_kind(e) {
        Some(ErrorKind::BadInput) => 2,
        Some(ErrorKind::WrongBase) => 3,
        Some(ErrorKind::CorruptDelta) => 4,
        Some(ErrorKind::Io) => 5,
        Some(ErrorKind::Mismatch) => 6,
        Some(ErrorKind::Interrupted) => 130,
        None => 1,
    }
}

/// The error class as `--json` names it.
fn kind_name(e: &anyhow::Error) -> &'static str {
    match error_kind(e) {
        Some(ErrorKind::BadInput) => "bad_input",
        Some(ErrorKind::WrongBase) => "wrong_base",
        Some(ErrorKind::CorruptDelta) => "corrupt_delta",
        Some(ErrorKind::Io) => "io",
        Some(ErrorKind::Mismatch) => "mismatch",
        Some(ErrorKind::Interrupted) => "interrupted",
        None => "internal",
    }
}

/// Parses a path argument that must be local (output directories, additive deltas), refusing
/// URLs: `s3://b/x` would otherwise be taken as a local path and create a directory `s3:`.
pub fn local_path(s: &str) -> Result<PathBuf, String> {
    if deltapack::remote::is_url(Path::new(s)) {
        return Err(format!(
            "'{s}' is a URL, and this is a local path (a rebuilt model is written to a local directory; deltas, stores and checkpoints to read may be at s3:// and file:// URLs)"
        ));
    }
    Ok(PathBuf::from(s))
}

/// Parses the location of a delta, a checkpoint or a store: a local path, `s3://BUCKET/KEY`
/// or `file:///PATH` (the bucket and key are checked when the location is opened; a
/// checkpoint at a URL is fetched into the local cache).
pub fn location(s: &str) -> Result<PathBuf, String> {
    let Some((scheme, _)) = s.split_once("://").filter(|_| deltapack::remote::is_url(Path::new(s))) else {
        return Ok(PathBuf::from(s));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "s3" | "s3a" | "file" => Ok(PathBuf::from(s)),
        _ => Err(format!(
            "'{s}' is a URL of a scheme deltapack does not read: give a local path, s3://BUCKET/KEY or file:///PATH"
        )),
    }
}

fn run(cli: Cli) -> Result<()> {
    if cli.global.endpoint.is_some() {
        deltapack::remote::set_endpoint(cli.global.endpoint.as_deref());
    }
    if let Some(n) = cli.global.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("starting the thread pool")?;
    }
    let g = &cli.global;
    let bars = progress::Bars::new(!g.quiet && !g.json && std::io::stderr().is_terminal());
    match cli.command {
        Command::Make {
            base,
            finetuned,
            output,
            parents,
            base_id,
            chunk_bytes,
            force,
            sync,
            self_contained,
            tensors,
            codec,
        } => {
            let (base, hub_id) = hub::resolve(&base)?;
            let (finetuned, _) = hub::resolve(&finetuned)?;
            let base_id = base_id.or(hub_id);
            let opts = deltapack::MakeOptions {
                base_id,
                chunk_bytes,
                force,
                sync,
                self_contained,
                codecs: codec.policy()?,
                ..Default::default()
            };
            let t = std::time::Instant::now();
            let r = deltapack::make_child(&base, &parents, &finetuned, &output, &opts, None, &bars)
                .with_context(|| format!("making {}", output.display()))?;
            report::make(g.json, &output, &r, t.elapsed(), tensors || g.verbose)
        }
        Command::Apply {
            base,
            deltas,
            output,
            force,
            sync,
            dtype,
            additive: forced,
        } => {
            let (base, _) = hub::resolve(&base)?;
            if let Some(how) = additive::recognise(&base, &deltas, forced)? {
                let opts = additive::options(force, sync, dtype);
                return additive::apply(&base, &deltas[0], &output, &opts, &how, g.json, &bars);
            }
            if dtype.is_some() {
                return Err(usage("--dtype applies only to an additive delta (a model directory)"));
            }
            let opts = deltapack::ApplyOptions {
                force,
                sync,
                aux_store: None,
            };
            let t = std::time::Instant::now();
            let r = deltapack::apply_chain(&base, &deltas, &output, &opts, &bars)
                .with_context(|| format!("applying {}", names(&deltas)))?;
            report::rebuild(g.json, "applied", Some(&output), &r, t.elapsed(), g.verbose)
        }
        Command::Import {
            wdelta,
            base,
            output,
            base_id,
            force,
            sync,
            no_base_check,
        } => {
            let (base, hub_id) = hub::resolve(&base)?;
            let opts = deltapack::import::ImportOptions {
                base_id: base_id.or(hub_id),
                force,
                sync,
                check_base_hash: !no_base_check,
            };
            let t = std::time::Instant::now();
            let r = deltapack::import::import_wdelta(&wdelta, &base, &output, &opts, &bars)
                .with_context(|| format!("importing {}", wdelta.display()))?;
            report::make(g.json, &output, &r, t.elapsed(), g.verbose)
        }
        Command::Inspect { delta, tensors } => {
            let inspection = deltapack::inspect(&delta).with_context(|| format!("inspecting {}", delta.display()))?;
            report::inspect(g.json, &delta, &inspection, tensors || g.verbose)
        }
        Command::Verify {
            base,
            deltas,
            finetuned,
            tensors,
        } => {
            let (base, _) = hub::resolve(&base)?;
            let finetuned = finetuned.map(|f| hub::resolve(&f).map(|r| r.0)).transpose()?;
            let t = std::time::Instant::now();
            let r = deltapack::Chain::open(&base, &deltas)
                .and_then(|c| deltapack::verify_chain(&c, finetuned.as_deref(), &bars))
                .with_context(|| format!("verifying {}", names(&deltas)))?;
            report::rebuild(g.json, "verified", None, &r, t.elapsed(), tensors || g.verbose)
        }
        Command::Squash {
            base,
            deltas,
            output,
            force,
        } => {
            let (base, _) = hub::resolve(&base)?;
            let opts = deltapack::MakeOptions {
                force,
                ..Default::default()
            };
            let t = std::time::Instant::now();
            let r = deltapack::squash(&base, &deltas, &output, &opts, &bars)
                .with_context(|| format!("squashing {}", names(&deltas)))?;
            report::make(g.json, &output, &r, t.elapsed(), g.verbose)
        }
        Command::Rebase {
            base,
            onto,
            deltas,
            output,
            base_id,
            force,
        } => {
            let (base, _) = hub::resolve(&base)?;
            let (onto, hub_id) = hub::resolve(&onto)?;
            let opts = deltapack::MakeOptions {
                force,
                base_id: base_id.or(hub_id),
                ..Default::default()
            };
            let t = std::time::Instant::now();
            let r = deltapack::rebase(&base, &deltas, &onto, &output, &opts, &bars)
                .with_context(|| format!("rebasing {}", names(&deltas)))?;
            report::make(g.json, &output, &r, t.elapsed(), g.verbose)
        }
        Command::Store(cmd) => store::run(cmd, g.json, &bars),
        Command::Sweep {
            base,
            finetuned,
            output,
            keep_deltas,
            force,
        } => {
            let (base, _) = hub::resolve(&base)?;
            let (finetuned, _) = hub::resolve(&finetuned)?;
            let s = sweep::Sweep {
                base: &base,
                finetuned: &finetuned,
                dir: &output,
                keep_deltas,
                force,
                json: g.json,
                quiet: g.quiet,
            };
            sweep::run(&s, &bars)
        }
        Command::Export {
            format: additive::Format::Additive,
            base,
            deltas,
            output,
            force,
            sync,
        } => {
            let (base, _) = hub::resolve(&base)?;
            let opts = deltapack::ExportOptions { force, sync };
            additive::export(&base, &deltas, &output, &opts, g.json, &bars)
        }
        Command::Demo { dir } => demo::run(dir, g.json, &bars),
        Command::Dev(d) => dev(d),
    }
}

/// The delta files of a chain, for messages.
fn names(deltas: &[PathBuf]) -> String {
    let v: Vec<String> = deltas.iter().map(|d| d.display().to_string()).collect();
    v.join(" -> ")
}

fn dev(cmd: Dev) -> Result<()> {
    match cmd {
        Dev::Synth { preset, shards, dir } => {
            let spec = match preset.as_str() {
                "reference" => synth::Spec::reference(),
                "demo" => synth::Spec::demo(),
                other => anyhow::bail!("unknown preset '{other}' (use reference or demo)"),
            };
            synth::write_model(&spec, &dir.join("base"), false, shards)?;
            synth::write_model(&spec, &dir.join("finetuned"), true, shards)?;
            Ok(())
        }
        Dev::Bounds { base, finetuned } => {
            let b = deltapack::checkpoint::Checkpoint::open(&base)?;
            let f = deltapack::checkpoint::Checkpoint::open(&finetuned)?;
            out!("{}", serde_json::to_string(&bounds::bounds(&b, &f))?);
            Ok(())
        }
    }
}
