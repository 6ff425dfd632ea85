//! Evaluations kept in the state database, each visible to the key that ran it (and to admin
//! keys), like training jobs.

use super::EvalView;
use crate::train::jobs::store::{EvaluationRow, Store, StoreError};
use crate::train::jobs::Requester;

/// Stores a finished evaluation.
pub fn save(store: &Store, view: &EvalView, by: &Requester) -> Result<(), StoreError> {
    store.insert_evaluation(&EvaluationRow {
        id: view.id.clone(),
        model_id: view.model_id.clone(),
        view: serde_json::to_string(view).unwrap_or_default(),
        created_at: view.created_at.clone(),
        owner: by.owner.clone(),
    })
}

fn view_of(row: &EvaluationRow) -> Option<EvalView> {
    match serde_json::from_str(&row.view) {
        Ok(view) => Some(view),
        Err(e) => {
            tracing::error!("evaluation {}: unreadable record ({e})", row.id);
            None
        }
    }
}

/// The evaluations `by` may see, oldest first, without their samples.
pub fn list(store: &Store, by: &Requester) -> Result<Vec<EvalView>, StoreError> {
    Ok(store
        .evaluations()?
        .iter()
        .filter(|row| by.may_see(row.owner.as_deref()))
        .filter_map(view_of)
        .map(|view| EvalView {
            samples: None,
            ..view
        })
        .collect())
}

/// One evaluation with its samples, if `by` may see it.
pub fn get(store: &Store, id: &str, by: &Requester) -> Result<Option<EvalView>, StoreError> {
    Ok(store
        .evaluation(id)?
        .filter(|row| by.may_see(row.owner.as_deref()))
        .as_ref()
        .and_then(view_of))
}

/// How many evaluations `by` may see.
pub fn count(store: &Store, by: &Requester) -> Result<u64, StoreError> {
    Ok(store
        .evaluations()?
        .iter()
        .filter(|row| by.may_see(row.owner.as_deref()))
        .count() as u64)
}
