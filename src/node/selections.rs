//! The pods each Service selector picks, remembered: every connection to a Service
//! asks the owner for the pods behind it, and finding them anew means reading the
//! labels of every pod of the namespace. What a selector picks changes only when a pod
//! is added, changed or removed, so the owner clears this then; statuses are not kept
//! here (they are read fresh for each connection).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::wire::PodUid;

/// Selections kept at most: Services are few, but nothing fed from outside is
/// unbounded; past this, all are dropped and found again as asked.
const MAX_SELECTIONS: usize = 1024;

type Selector = BTreeMap<String, String>;
/// A namespace and a selector.
type Key = (String, Selector);

#[derive(Debug, Default)]
pub struct Selections {
    // Filled in while the owner is only read (a route is decided from `&Owner`).
    by_selector: RefCell<HashMap<Key, Arc<[PodUid]>>>,
}

impl Selections {
    /// The pods `selector` picks in `namespace`, found with `find` unless kept.
    pub fn get_or_find(
        &self,
        namespace: &str,
        selector: &Selector,
        find: impl FnOnce() -> Vec<PodUid>,
    ) -> Arc<[PodUid]> {
        let key = (namespace.to_string(), selector.clone());
        if let Some(uids) = self.by_selector.borrow().get(&key) {
            return uids.clone();
        }
        let uids: Arc<[PodUid]> = find().into();
        let mut kept = self.by_selector.borrow_mut();
        if kept.len() >= MAX_SELECTIONS {
            kept.clear();
        }
        kept.insert(key, uids.clone());
        uids
    }

    /// A pod was added, changed or removed: any selection may differ now.
    pub fn clear(&mut self) {
        self.by_selector.get_mut().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(app: &str) -> Selector {
        BTreeMap::from([("app".to_string(), app.to_string())])
    }

    fn uids(names: &[&str]) -> Vec<PodUid> {
        names.iter().map(|n| PodUid(n.to_string())).collect()
    }

    #[test]
    fn a_selection_is_found_once_until_cleared_per_namespace_and_selector() {
        let mut selections = Selections::default();
        let found = std::cell::Cell::new(0);
        let find = |names: &'static [&'static str]| {
            found.set(found.get() + 1);
            uids(names)
        };
        let web = selections.get_or_find("default", &selector("web"), || find(&["a", "b"]));
        assert_eq!(&*web, uids(&["a", "b"]).as_slice());
        let again = selections.get_or_find("default", &selector("web"), || find(&["c"]));
        assert_eq!(&*again, uids(&["a", "b"]).as_slice(), "kept");
        assert_eq!(found.get(), 1);
        // Another namespace or selector is its own selection.
        let other = selections.get_or_find("other", &selector("web"), || find(&["d"]));
        assert_eq!(&*other, uids(&["d"]).as_slice());
        let db = selections.get_or_find("default", &selector("db"), || find(&[]));
        assert!(db.is_empty());
        assert_eq!(found.get(), 3);

        selections.clear();
        let after = selections.get_or_find("default", &selector("web"), || find(&["c"]));
        assert_eq!(&*after, uids(&["c"]).as_slice(), "found anew once cleared");
    }

    #[test]
    fn selections_are_bounded() {
        let selections = Selections::default();
        for i in 0..MAX_SELECTIONS + 10 {
            selections.get_or_find("default", &selector(&i.to_string()), Vec::new);
            assert!(selections.by_selector.borrow().len() <= MAX_SELECTIONS);
        }
    }
}
