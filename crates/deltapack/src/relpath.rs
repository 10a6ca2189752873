//! Relative paths read from hostile input (indexes, manifests, object listings).

/// True for a relative path of plain components: no root, no `..`, no `.`, no empty part,
/// no backslash or NUL, so joining it to a directory can never leave that directory.
pub fn is_safe_rel_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 4096
        && !p.starts_with('/')
        && !p.contains('\\')
        && !p.contains('\0')
        && p.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains(':'))
}
