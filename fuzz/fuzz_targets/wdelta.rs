//! Fuzzes the deltatensors .wdelta parser and decoder with arbitrary files. The SHA-256
//! trailer is checked but its verdict ignored, so mutated files reach the parser.
#![no_main]

use deltapack::import::wdelta;
use libfuzzer_sys::fuzz_target;

/// Tensors larger than this are skipped: decoding allocates one float per element, and the
/// importer bounds that by the base tensor's size before it decodes.
const MAX_ELEMENTS: usize = 1 << 22;

fuzz_target!(|data: &[u8]| {
    let _ = wdelta::verify_checksum(data, &mut |_| {});
    let Ok(layout) = wdelta::parse(data) else {
        return;
    };
    let mut delta = Vec::new();
    for t in layout.tensors.iter().filter(|t| t.numel <= MAX_ELEMENTS) {
        let _ = wdelta::decode(data, t, &mut delta);
    }
});
