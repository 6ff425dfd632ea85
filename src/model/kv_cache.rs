//! The KV cache of one sequence, shared by candle's ops and the fused CPU path.

use candle_core::{DType, Device, Tensor};

/// A prefilled sequence: its KV cache and the logits of its last position.
pub type Prefilled = (Cache, Vec<f32>);

/// The KV cache of one sequence, per layer in one of two forms: candle tensors (b, n_kv, t,
/// head_dim) for candle's ops, or host vectors the fused CPU path appends to in place. A layer
/// may hold both only while they agree: whichever path appends clears the other form, and a
/// path that finds only the other form converts it once.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    pub(crate) kvs: Vec<Option<(Tensor, Tensor)>>,
    pub(crate) host: Vec<Option<HostKv>>,
    pub(crate) len: usize,
    /// Per batch row, the token ids of the cached positions, kept only for a model that reads
    /// the token before a pass's first (nanochat's smear); empty otherwise.
    pub(crate) tokens: Vec<Vec<u32>>,
}

/// One layer's keys and values for the fused path, position-major: (positions, n_kv,
/// head_dim). Shared copy-on-write, so caching a sequence (prefix cache, a truncated view)
/// copies nothing until it is appended to.
#[derive(Debug, Clone)]
pub(crate) struct HostKv {
    pub k: std::sync::Arc<Vec<f32>>,
    pub v: std::sync::Arc<Vec<f32>>,
    /// Positions in use (the vectors may hold more: a truncated view of a longer sequence).
    pub len: usize,
}

impl HostKv {
    /// Appends `k`/`v` rows of `stride` = n_kv · head_dim values each: in place when this is
    /// the vectors' only owner and nothing follows `len`, else into fresh copies.
    pub(crate) fn append(&mut self, k: &[f32], v: &[f32], stride: usize) {
        let keep = self.len * stride;
        for (store, new) in [(&mut self.k, k), (&mut self.v, v)] {
            match std::sync::Arc::get_mut(store) {
                Some(vec) if vec.len() == keep => vec.extend_from_slice(new),
                _ => {
                    let mut fresh = Vec::with_capacity((keep + new.len()).next_power_of_two());
                    fresh.extend_from_slice(&store[..keep]);
                    fresh.extend_from_slice(new);
                    *store = std::sync::Arc::new(fresh);
                }
            }
        }
        self.len += k.len() / stride;
    }
}

impl Cache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            kvs: vec![None; n_layers],
            host: vec![None; n_layers],
            len: 0,
            tokens: Vec::new(),
        }
    }
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cache of batch row `row`, first `len` positions: one sequence out of a batched
    /// prefill. Copied (≈ 46 KB per position for the default model) rather than a view, so that
    /// keeping it — e.g. in the prefix cache — does not keep the whole batch's tensors alive.
    pub fn row(&self, row: usize, len: usize) -> candle_core::Result<Self> {
        if len > self.len {
            candle_core::bail!("cannot take {len} positions of a cache of {}", self.len);
        }
        if row == 0 && self.host.iter().any(Option::is_some) {
            // A single sequence's cache (only batched prefills have other rows).
            return self.truncated(len);
        }
        let kvs = self
            .kvs
            .iter()
            .map(|kv| match kv {
                Some((k, v)) => Ok(Some((
                    k.narrow(0, row, 1)?.narrow(2, 0, len)?.force_contiguous()?,
                    v.narrow(0, row, 1)?.narrow(2, 0, len)?.force_contiguous()?,
                ))),
                None => Ok(None),
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            host: vec![None; self.kvs.len()],
            kvs,
            len,
            tokens: self
                .tokens
                .get(row)
                .map(|t| vec![t[..len.min(t.len())].to_vec()])
                .unwrap_or_default(),
        })
    }

    /// The cache of the first `len` positions (views, no copy).
    pub fn truncated(&self, len: usize) -> candle_core::Result<Self> {
        if len > self.len {
            candle_core::bail!("cannot truncate a cache of {} to {len}", self.len);
        }
        let kvs = self
            .kvs
            .iter()
            .map(|kv| match kv {
                Some((k, v)) => Ok(Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))),
                None => Ok(None),
            })
            .collect::<candle_core::Result<_>>()?;
        let host = self
            .host
            .iter()
            .map(|h| {
                h.as_ref().map(|h| HostKv {
                    k: h.k.clone(),
                    v: h.v.clone(),
                    len,
                })
            })
            .collect();
        let tokens = self
            .tokens
            .iter()
            .map(|t| t[..len.min(t.len())].to_vec())
            .collect();
        Ok(Self {
            kvs,
            host,
            len,
            tokens,
        })
    }

    /// Layer `layer` as host vectors holding this cache's `len` positions (converted from the
    /// tensors if that is the form it is in), for the fused path.
    pub(crate) fn host_layer(
        &mut self,
        layer: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> candle_core::Result<&mut HostKv> {
        self.fit(layer + 1);
        let len = self.len;
        let fresh = match (&self.host[layer], &self.kvs[layer]) {
            (Some(h), _) if h.len == len => None,
            (_, Some((k, v))) if len > 0 => {
                let to_host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
                    if t.dims() != [1, n_kv, len, head_dim] {
                        candle_core::bail!("KV cache of shape {:?} for {len} positions", t.dims());
                    }
                    t.squeeze(0)?
                        .transpose(0, 1)?
                        .flatten_all()?
                        .to_vec1::<f32>()
                };
                Some(HostKv {
                    k: std::sync::Arc::new(to_host(k)?),
                    v: std::sync::Arc::new(to_host(v)?),
                    len,
                })
            }
            _ if len == 0 => Some(HostKv {
                k: Default::default(),
                v: Default::default(),
                len: 0,
            }),
            _ => candle_core::bail!("KV cache missing for {len} cached positions"),
        };
        if let Some(h) = fresh {
            self.host[layer] = Some(h);
        }
        self.host[layer]
            .as_mut()
            .ok_or_else(|| candle_core::Error::Msg("KV cache missing".into()))
    }

    /// Before candle's ops append to layer `layer`: its tensors, converted from the host
    /// vectors if that is the form it is in. The host form is dropped (it is about to be stale).
    pub(crate) fn tensors_for_candle(
        &mut self,
        layer: usize,
        n_kv: usize,
        head_dim: usize,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<()> {
        self.fit(layer + 1);
        if let Some(h) = self.host[layer].take() {
            let stale = !matches!(&self.kvs[layer], Some((k, _)) if k.dim(2)? == self.len);
            if stale && self.len > 0 {
                let n = self.len * n_kv * head_dim;
                let to_tensor = |data: &[f32]| -> candle_core::Result<Tensor> {
                    Tensor::from_slice(&data[..n], (1, self.len, n_kv, head_dim), device)?
                        .transpose(1, 2)?
                        .contiguous()?
                        .to_dtype(dtype)
                };
                self.kvs[layer] = Some((to_tensor(&h.k)?, to_tensor(&h.v)?));
            }
        }
        Ok(())
    }

    fn fit(&mut self, n_layers: usize) {
        if self.kvs.len() < n_layers {
            self.kvs.resize(n_layers, None);
        }
        if self.host.len() < n_layers {
            self.host.resize(n_layers, None);
        }
    }
}
