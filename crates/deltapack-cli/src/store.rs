//! `deltapack store ...`: argument parsing and printing around `deltapack::store`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use deltapack::progress::Progress;
use deltapack::store::{Manifest, Store};
use serde_json::json;

use crate::report::{human, print_json};
use crate::CodecArgs;

/// Store subcommands.
#[derive(Subcommand)]
pub enum StoreCommand {
    /// Create a store with a base (or add another base to an existing store).
    Init {
        /// The store: a directory, or an s3:// (or file://) URL of a prefix.
        #[arg(value_parser = crate::location)]
        store: PathBuf,
        /// The base checkpoint (copied into the store).
        #[arg(long, value_parser = crate::location)]
        base: PathBuf,
        /// Name of the base in the store (default: its directory name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Add a fine-tune as a delta against the base or the stored model that gives the
    /// smallest delta (estimated on sampled chunks), unless --parent names one.
    Add {
        /// The store: a directory, or an s3:// (or file://) URL of a prefix.
        #[arg(value_parser = crate::location)]
        store: PathBuf,
        /// Name of the new entry.
        name: String,
        /// The fine-tuned checkpoint.
        #[arg(value_parser = crate::location)]
        finetuned: PathBuf,
        /// Code against this entry instead of choosing.
        #[arg(long)]
        parent: Option<String>,
        #[command(flatten)]
        codec: CodecArgs,
    },
    /// Show the lineage tree with sizes, ratios, and total against naive storage.
    List {
        /// The store: a directory, or an s3:// (or file://) URL of a prefix.
        #[arg(value_parser = crate::location)]
        store: PathBuf,
    },
    /// Rebuild an entry into a directory (byte-identical files for exact deltas).
    Get {
        /// The store: a directory, or an s3:// (or file://) URL of a prefix.
        #[arg(value_parser = crate::location)]
        store: PathBuf,
        /// The entry.
        name: String,
        /// Output directory.
        #[arg(short, long, value_parser = crate::local_path)]
        output: PathBuf,
        /// Replace an existing output directory.
        #[arg(long)]
        force: bool,
    },
    /// Remove an entry.
    Rm {
        /// The store: a directory, or an s3:// (or file://) URL of a prefix.
        #[arg(value_parser = crate::location)]
        store: PathBuf,
        /// The entry.
        name: String,
        /// Re-code the entries coded against it against its parent instead of refusing.
        #[arg(long)]
        reparent: bool,
    },
    /// Verify everything: manifest, files, and every entry rebuilt through its chain; remove
    /// what interrupted operations left.
    Fsck {
        /// The store: a directory, or an s3:// (or file://) URL of a prefix.
        #[arg(value_parser = crate::location)]
        store: PathBuf,
        /// In object storage, remove objects the manifest does not name only once they are
        /// this many seconds old (an add in progress on another machine has such objects).
        #[arg(long, value_name = "SECONDS", default_value_t = deltapack::store::DEFAULT_GRACE.as_secs())]
        grace: u64,
    },
}

/// Runs a store subcommand.
pub fn run(cmd: StoreCommand, json_out: bool, bars: &dyn Progress) -> Result<()> {
    match cmd {
        StoreCommand::Init { store, base, name } => {
            let (base, _) = deltapack::checkpoint::hub::resolve(&base)?;
            Store::init(&store, &base, name.as_deref()).with_context(|| format!("initialising {}", store.display()))?;
            list(&store, json_out)
        }
        StoreCommand::Add {
            store,
            name,
            finetuned,
            parent,
            codec,
        } => {
            let (finetuned, _) = deltapack::checkpoint::hub::resolve(&finetuned)?;
            let opts = deltapack::MakeOptions {
                codecs: codec.policy()?,
                ..Default::default()
            };
            let t = std::time::Instant::now();
            let s = Store::open(&store)?;
            let (e, r) = s
                .add(&name, &finetuned, parent.as_deref(), &opts, bars)
                .with_context(|| format!("adding {name} to {}", store.display()))?;
            if json_out {
                return print_json(&json!({"entry": e, "report": r, "seconds": t.elapsed().as_secs_f64()}));
            }
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            let against = e
                .parent
                .as_deref()
                .map_or(format!("base {}", e.base), |p| format!("entry {p}"));
            let how = match e.codec.as_str() {
                "identical" => "identical to it: no tensor or file changed, nothing coded".to_string(),
                codec => format!("{codec}, {}", crate::report::count(r.lossy as u64, "lossy tensor")),
            };
            out!(
                "added {} against {against}: {} ({:.1}x smaller than its {}), {how}, in {:.2} s",
                e.name,
                human(e.delta_bytes),
                e.finetuned_bytes as f64 / e.delta_bytes.max(1) as f64,
                human(e.finetuned_bytes),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        StoreCommand::List { store } => list(&store, json_out),
        StoreCommand::Get {
            store,
            name,
            output,
            force,
        } => {
            let t = std::time::Instant::now();
            let r = Store::open(&store)?
                .get(&name, &output, force, bars)
                .with_context(|| format!("getting {name} from {}", store.display()))?;
            crate::report::rebuild(json_out, "rebuilt", Some(&output), &r, t.elapsed(), false)
        }
        StoreCommand::Rm { store, name, reparent } => {
            let moved = Store::open(&store)?
                .remove(&name, reparent, bars)
                .with_context(|| format!("removing {name} from {}", store.display()))?;
            if json_out {
                return print_json(&json!({"removed": name, "reparented": moved}));
            }
            out!(
                "removed {name}{}",
                match moved.is_empty() {
                    true => String::new(),
                    false => format!("; re-coded {} against its parent", moved.join(", ")),
                }
            );
            Ok(())
        }
        StoreCommand::Fsck { store, grace } => {
            let r = Store::open(&store)?
                .fsck_with_grace(std::time::Duration::from_secs(grace), bars)
                .with_context(|| format!("checking {}", store.display()))?;
            if json_out {
                return print_json(&json!({"ok": true, "report": r}));
            }
            out!(
                "ok: {}, {} rebuilt through their chains, {}; every fingerprint matched{}",
                crate::report::count(r.bases as u64, "base"),
                crate::report::count(r.entries as u64, "entry"),
                crate::report::count(r.aux_files as u64, "auxiliary file"),
                match r.leftovers_removed {
                    0 => String::new(),
                    n => format!(
                        "; removed {} of interrupted operations",
                        crate::report::count(n as u64, "leftover")
                    ),
                }
            );
            Ok(())
        }
    }
}

fn list(store: &Path, json_out: bool) -> Result<()> {
    let m = Store::open(store)?.manifest()?;
    let naive: u64 = m.entries.iter().map(|e| e.finetuned_bytes).sum();
    let stored: u64 = m.entries.iter().map(|e| e.delta_bytes).sum();
    if json_out {
        return print_json(&json!({"manifest": m, "naive_bytes": naive, "delta_bytes": stored}));
    }
    for b in &m.bases {
        let size: u64 = b.files.iter().map(|f| f.size).sum();
        out!("base {}  {}", b.name, human(size));
        tree(&m, &b.name, None, 1);
    }
    if m.entries.is_empty() {
        out!(
            "no entries yet ({}); add fine-tunes with `deltapack store add {} NAME FINETUNED`",
            crate::report::count(m.bases.len() as u64, "base"),
            store.display()
        );
        return Ok(());
    }
    out!(
        "{}: {} of deltas for {} of fine-tunes ({:.1}x smaller than storing each whole)",
        crate::report::count(m.entries.len() as u64, "entry"),
        human(stored),
        human(naive),
        naive as f64 / stored.max(1) as f64
    );
    Ok(())
}

fn tree(m: &Manifest, base: &str, parent: Option<&str>, depth: usize) {
    for e in m
        .entries
        .iter()
        .filter(|e| e.base == base && e.parent.as_deref() == parent)
    {
        out!(
            "{}{}  {}  {:.1}x  {}",
            "  ".repeat(depth),
            e.name,
            human(e.delta_bytes),
            e.finetuned_bytes as f64 / e.delta_bytes.max(1) as f64,
            e.codec
        );
        tree(m, base, Some(&e.name), depth + 1);
    }
}
