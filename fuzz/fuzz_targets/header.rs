//! Fuzzes the safetensors header parser with arbitrary file prefixes.
#![no_main]

use deltapack::checkpoint::header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = header::parse(data, Some(data.len() as u64));
    let _ = header::parse(data, None);
});
