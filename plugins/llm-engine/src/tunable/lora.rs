//! LoRA adapters (`W x + (α/r)·B A x`, B zero at start) on a model's linear modules, several at
//! once (Multi-LoRA: a shared adapter plus a task's), saved and loaded in PEFT's format so an
//! adapter trained here loads in Python (`PeftModel.from_pretrained`) and back.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use recfuse_sdk::SeededRng;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::CausalLm;

pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Module names as PEFT spells them (`q_proj`, `query_key_value`, ...).
    pub targets: Vec<String>,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Checks the spec against a model; errors name the tuner config key at fault.
    pub fn check(&self, model: &dyn CausalLm) -> Result<()> {
        ensure!(self.r > 0, "`rank` must be at least 1");
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "`dropout` must be in [0, 1), got {}",
            self.dropout
        );
        ensure!(!self.targets.is_empty(), "`target_modules` is empty");
        let known: Vec<&str> = model.modules().iter().map(|m| m.name).collect();
        for t in &self.targets {
            ensure!(
                known.contains(&t.as_str()),
                "`target_modules`: the {} model has no module `{t}` (it has {})",
                model.family(),
                known.join(", ")
            );
        }
        Ok(())
    }
}

/// One adapter: an (A `[r, in]`, B `[out, r]`) pair per targeted module of every layer.
pub struct Adapter {
    pub name: String,
    pub spec: LoraSpec,
    /// Keyed by (layer, module name).
    pairs: BTreeMap<(usize, String), (Var, Var)>,
}

impl Adapter {
    /// A fresh adapter initialised as PEFT does: A Kaiming-uniform (bound 1/√in), B zero, so
    /// the adapted model starts equal to the base.
    pub fn new(
        name: &str,
        spec: &LoraSpec,
        model: &dyn CausalLm,
        rng: &mut SeededRng,
    ) -> Result<Self> {
        spec.check(model)?;
        let mut pairs = BTreeMap::new();
        for layer in 0..model.layers() {
            for m in model
                .modules()
                .iter()
                .filter(|m| spec.targets.iter().any(|t| t == m.name))
            {
                let bound = 1.0 / (m.inputs as f32).sqrt();
                let a: Vec<f32> = (0..spec.r * m.inputs)
                    .map(|_| ((rng.unit() as f32) * 2.0 - 1.0) * bound)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (spec.r, m.inputs), &Device::Cpu)?)?;
                let b = Var::zeros((m.outputs, spec.r), DType::F32, &Device::Cpu)?;
                pairs.insert((layer, m.name.to_string()), (a, b));
            }
        }
        Ok(Self {
            name: name.to_string(),
            spec: spec.clone(),
            pairs,
        })
    }

    /// Every trainable tensor with a stable name (`{peft key}.lora_A.weight`, ...).
    pub fn named_vars(&self, model: &dyn CausalLm) -> Vec<(String, Var)> {
        let mut out = Vec::with_capacity(self.pairs.len() * 2);
        for ((layer, module), (a, b)) in &self.pairs {
            let key = model.peft_key(*layer, module);
            out.push((format!("{key}.lora_A.weight"), a.clone()));
            out.push((format!("{key}.lora_B.weight"), b.clone()));
        }
        out
    }

    fn pair(&self, layer: usize, module: &str) -> Option<&(Var, Var)> {
        self.pairs.get(&(layer, module.to_string()))
    }

    /// Writes `adapter_model.safetensors` (PEFT key names, metadata `format = pt`) and
    /// `adapter_config.json` into `dir`.
    pub fn save_peft(&self, dir: &Path, model: &dyn CausalLm, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tensors: Vec<(String, Tensor)> = self
            .named_vars(model)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, &[("format", "pt")])?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.spec.r,
            "lora_alpha": self.spec.alpha,
            "lora_dropout": self.spec.dropout,
            "target_modules": self.spec.targets,
            "base_model_name_or_path": base_model,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "use_rslora": false,
            "use_dora": false,
        });
        write_file(
            &dir.join(CONFIG_FILE),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )
    }

    /// Reads an adapter saved in PEFT's format, checking that it fits `model`: every tensor it
    /// should have is there with the right shape, and it has no others.
    pub fn load_peft(name: &str, dir: &Path, model: &dyn CausalLm) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        #[derive(Deserialize)]
        struct PeftConfig {
            peft_type: String,
            r: usize,
            lora_alpha: f64,
            #[serde(default)]
            lora_dropout: f32,
            target_modules: Vec<String>,
        }
        let c: PeftConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a PEFT adapter config", cfg_path.display()))?;
        ensure!(
            c.peft_type == "LORA",
            "{}: peft_type {:?}, only LORA is supported",
            cfg_path.display(),
            c.peft_type
        );
        let spec = LoraSpec {
            r: c.r,
            alpha: c.lora_alpha,
            dropout: c.lora_dropout,
            targets: c.target_modules,
        };
        spec.check(model).with_context(|| {
            format!(
                "adapter {} does not fit the {} model",
                dir.display(),
                model.family()
            )
        })?;
        let path = dir.join(WEIGHTS_FILE);
        let mut tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(&path, &Device::Cpu)
                .with_context(|| format!("reading {}", path.display()))?;
        let mut adapter = Self::new(name, &spec, model, &mut SeededRng::new(0))?;
        for (key, var) in adapter.named_vars(model) {
            let t = tensors.remove(&key).with_context(|| {
                format!(
                    "{}: tensor `{key}` is missing (adapter for another model?)",
                    path.display()
                )
            })?;
            ensure!(
                t.dims() == var.dims(),
                "{}: `{key}` has shape {:?}, the model needs {:?} (adapter for another model?)",
                path.display(),
                t.dims(),
                var.dims()
            );
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        if let Some(extra) = tensors.keys().next() {
            bail!("{}: tensor `{extra}` matches no module of the {} model (adapter for another model?)", path.display(), model.family());
        }
        adapter.name = name.to_string();
        Ok(adapter)
    }
}

/// The adapters active in one forward pass, and whether LoRA dropout applies (training).
pub struct LoraStack<'a> {
    adapters: Vec<&'a Adapter>,
    dropout: Option<RefCell<SeededRng>>,
    /// No gradient will be asked for: the adapters enter as constants, so the forward pass
    /// builds no autograd graph (scoring).
    frozen: bool,
}

impl<'a> LoraStack<'a> {
    /// The base model alone.
    pub fn none() -> Self {
        Self::eval(vec![])
    }

    /// Adapters without dropout, gradients still available (validation, gradient checks).
    pub fn eval(adapters: Vec<&'a Adapter>) -> Self {
        Self {
            adapters,
            dropout: None,
            frozen: false,
        }
    }

    /// For scoring: adapters without dropout, as constants.
    pub fn frozen(adapters: Vec<&'a Adapter>) -> Self {
        Self {
            frozen: true,
            ..Self::eval(adapters)
        }
    }

    /// For training: dropout masks drawn from `seed`, so a step can be replayed exactly.
    pub fn train(adapters: Vec<&'a Adapter>, seed: u64) -> Self {
        Self {
            adapters,
            dropout: Some(RefCell::new(SeededRng::new(seed))),
            frozen: false,
        }
    }

    /// `base` (the module's output for `x`) plus every active adapter's update.
    pub fn apply(&self, layer: usize, module: &str, x: &Tensor, base: Tensor) -> Result<Tensor> {
        let mut out = base;
        for adapter in &self.adapters {
            let Some((a, b)) = adapter.pair(layer, module) else {
                continue;
            };
            let x = match &self.dropout {
                Some(rng) if adapter.spec.dropout > 0.0 => {
                    dropout(x, adapter.spec.dropout, &mut rng.borrow_mut())?
                }
                _ => x.clone(),
            };
            let (a, b) = match self.frozen {
                true => (a.as_tensor().detach(), b.as_tensor().detach()),
                false => (a.as_tensor().clone(), b.as_tensor().clone()),
            };
            let update = super::ops::linear(&super::ops::linear(&x, &a, None)?, &b, None)?;
            out = (out + (update * adapter.spec.scale())?)?;
        }
        Ok(out)
    }
}

/// Inverted dropout with a mask from our own seeded generator (candle's CPU random numbers
/// cannot be seeded per call, and a resumed run must draw the same masks).
fn dropout(x: &Tensor, p: f32, rng: &mut SeededRng) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if (rng.unit() as f32) < p { 0.0 } else { keep })
        .collect();
    Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?)?)
}

/// Writes f32 tensors as safetensors with string metadata, synced.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &[(&str, &str)],
) -> Result<()> {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| -> Result<_> {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            Ok((
                k.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                t.dims().to_vec(),
            ))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(k, bytes, shape)| {
            Ok((
                k.clone(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytes,
                )?,
            ))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let bytes = safetensors::serialize(views, Some(meta))?;
    write_file(path, &bytes)
}

/// Writes a file through a synced temporary sibling and a rename, then syncs the directory:
/// a crash leaves the old file or the new one, never a torn one.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).ok();
    }
    Ok(())
}
