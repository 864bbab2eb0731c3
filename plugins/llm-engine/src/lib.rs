//! In-process LLM for recfuse: a llama-architecture GGUF model (SmolLM2-135M-Instruct by
//! default) run with candle, with its tokenizer and chat template taken from the GGUF metadata,
//! and batched greedy or sampled generation across many prompts. Used by the `local-llm` fuser
//! and by `recfuse serve-llm`. [`tunable`] holds the trainable f32 models (Llama from GGUF,
//! ChatGLM2/3 from a checkpoint directory) and LoRA adapters the `lora` tuner trains.

mod decode_attention;
mod generate;
mod model;
mod prefix;
mod q8;
mod simd;
mod tokenizer;
pub mod tunable;

pub use generate::{Completion, Decoding, FinishReason, GenParams, Llm, Message, OnText, KV_BLOCK};
pub use model::{Hyper, Kernel};
pub use q8::Isa;
pub use tokenizer::GgufTokenizer;
