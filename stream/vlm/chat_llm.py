"""What every family shares on the LLM side: tokenizing and embedding text, the ids that end an
answer, the size of a prompt token in the KV cache, putting the kept visual vectors in place
among a plan's text embeddings, and greedy decoding (stream/vlm/decode.py).

A family (stream/vlm/<family>/model.py) subclasses `ChatLLM` and adds what is its own: the
vision tower (`encode`), its prompt plan and positions, and where its LLM differs (Qwen3-VL's
deepstack in `forward` and `layout`, LLaVA-OneVision's newline in `embed`). Every family's LLM
attends over grouped KV heads without copying them on the CPU (stream/vlm/grouped_attention.py).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from transformers import DynamicCache

from pruning import TokenSet

from . import decode, grouped_attention
from .base import Columns, Generation, LayoutSettings, Prompt, PromptPlan
from .instance_cache import instance_cache
from .kv_cache import BufferedCache
from .layer_pruning import LayerPruned, Schedule, check_layers

VIDEO_PLACEHOLDER = "\x00video\x00"  # where the video goes in a rendered chat template


_ONE_TOKEN = Columns.of([0], [0.0])


class ChatLLM:
    """The LLM half of a loaded family: `model` (a transformers VLM) and its tokenizer."""

    pruner_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}  # pruner -> the papers' setting for the family

    def __init__(self, model, tokenizer, name: str, random_weights: bool):
        """Takes a loaded transformers VLM; its text model's attention becomes the grouped one
        (stream/vlm/grouped_attention.py: exact, no copy of the KV cache per layer on the CPU)."""
        self.model = model.eval()
        grouped_attention.install(model)
        self.tokenizer = tokenizer
        self.name = name
        self.random_weights = random_weights
        self.hidden_size = int(model.config.text_config.hidden_size)
        self.eos_ids = self._eos_ids()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def kv_bytes_per_token(self) -> int:
        tc = self.model.config.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * self.dtype.itemsize

    def _eos_ids(self) -> list[int]:
        """The generation config's end ids and the chat turn's end, `<|im_end|>`."""
        eos = self.model.generation_config.eos_token_id or self.model.config.text_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return sorted({int(i) for i in ids if i is not None} | ({int(im_end)} if im_end is not None else set()))

    def tokenize(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    @torch.inference_mode()
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    def question_embeds(self, text: str) -> torch.Tensor:
        """The LLM input-embedding rows of the question's tokens [L, D] (for query-aware pruning)."""
        return self.embed_ids(self.tokenize(text)).float().cpu()

    @torch.inference_mode()
    def question_states(self, text: str, layer: int) -> torch.Tensor:
        """Hidden states [L, D] of the question's chat-formatted tokens (what follows the video
        in this family's prompt: the question, the turn's end and the assistant prompt) at the
        input of decoder layer `layer`, run alone through layers 0..layer-1 at positions
        0..L-1 (layer 0: their input embeddings; a layer past the LLM's depth gives its last
        layer's output, as a pruner names the paper's layer and the model may be shallower).
        The last row is the prompt's last token, the paper's instruction state.

        A departure from HieraVid (Eq. 8, 11), where the instruction's hidden state is taken
        inside the prompt and has attended to the video: ranking picks which tokens go into the
        prompt, so it runs before there is one, and the question alone is what is known then."""
        if layer < 0:
            raise ValueError(f"layer must be >= 0, got {layer}")
        layer = min(layer, len(self.model.model.language_model.layers))
        plan = self.plan(_ONE_TOKEN, text, LayoutSettings(timestamps="text"))  # "text": no span line to fake
        hidden = self.embed(plan, torch.zeros(0, self.hidden_size), plan.prefix_len)
        if layer:
            suffix = plan.position_ids[..., plan.prefix_len:]
            positions = torch.arange(suffix.shape[-1]).expand_as(suffix)  # from 0, in the family's position rows
            hidden = LayerPruned(self, ()).run_layers(hidden, positions, DynamicCache(config=self.model.config), 0, layer)
        return hidden[0].float().cpu()

    def check_layer_schedule(self, schedule: Schedule) -> None:
        """A ValueError when this family cannot run `schedule` (stream/vlm/layer_pruning.py):
        a stage past the last layer, or a family whose own `forward` feeds the LLM more than
        embeddings (Qwen3-VL's deepstack), which the layer loop does not reproduce."""
        if schedule and type(self).forward is not ChatLLM.forward:
            raise ValueError(f"{self.name}: layer pruning runs the plain decoder stack, and this family's LLM "
                             "takes side features of its visual tokens (its own forward)")
        check_layers(schedule, len(self.model.model.language_model.layers))

    @instance_cache(maxsize=64)
    def _before_video(self, system: str) -> torch.Tensor:
        return self.chat_parts(system, "")[0]

    def chat_parts(self, system: str, after_video: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokenizer's chat template rendered around the video: (ids before it, ids after it
        up to the assistant prompt). The video opens the user turn, so the ids before it depend
        on the system prompt only. The family adds its own video markers."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": system},
             {"role": "user", "content": f"{VIDEO_PLACEHOLDER}{after_video}"}],
            tokenize=False, add_generation_prompt=True,
        )
        before, after = text.split(VIDEO_PLACEHOLDER)
        return self.tokenize(before), self.tokenize(after)

    @torch.inference_mode()
    def embed_visual(self, plan: PromptPlan, visual: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Input embeddings [end - start, D] of plan tokens start..end: text from the embedding
        table, the visual tokens among them from `visual` in order."""
        is_vis = plan.visual[start:end] >= 0
        if int(is_vis.sum()) != len(visual):
            raise ValueError(f"{int(is_vis.sum())} visual tokens in tokens {start}..{end}, {len(visual)} vectors given")
        out = self.embed_ids(plan.ids[start:end])
        out[is_vis.to(self.device)] = visual.to(self.device, self.dtype)
        return out

    def embed(self, plan: PromptPlan, visual: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Input embeddings [1, end - start, D] of plan tokens start..end (`VideoLM.embed`)."""
        return self.embed_visual(plan, visual, start, len(plan) if end is None else end).unsqueeze(0)

    def layout(self, seen: TokenSet, question: str, settings: LayoutSettings) -> Prompt:
        """The whole prompt for `question` over the kept tokens `seen` (in temporal order)."""
        plan = self.plan(seen, question, settings)
        return Prompt(plan, self.embed(plan, seen.tokens[plan.visual[plan.visual >= 0]]))

    def new_cache(self, max_tokens: int) -> BufferedCache:
        return BufferedCache(self.model.config, max_tokens)

    @torch.inference_mode()
    def forward(self, cache: Any, embeds: torch.Tensor, position_ids: torch.Tensor, logits: bool,
                visual: torch.Tensor | None = None, extras: Mapping[str, torch.Tensor] | None = None
                ) -> torch.Tensor | None:
        """The LLM over `embeds` on `cache`, with a mask over everything cached and new (a family
        without side features ignores `visual` and `extras`; Qwen3-VL overrides this)."""
        n = cache.get_seq_length() + embeds.shape[1]
        mask = torch.ones(1, n, dtype=torch.long, device=self.device)
        if not logits:  # the decoder alone: no logits to compute
            self.model.model.language_model(inputs_embeds=embeds, position_ids=position_ids.to(self.device),
                                            attention_mask=mask, past_key_values=cache, use_cache=True)
            return None
        out = self.model(inputs_embeds=embeds, position_ids=position_ids.to(self.device), attention_mask=mask,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def generate(self, prompt: Prompt, max_new_tokens: int, on_text: Callable[[str], None] | None = None,
                 cache: Any = None, stop: threading.Event | None = None, layer_schedule: Schedule = ()) -> Generation:
        """Greedy decoding with explicit positions (stream/vlm/decode.py), with visual tokens
        dropped inside the LLM at `layer_schedule`'s stages when one is given."""
        self.check_layer_schedule(layer_schedule)
        return decode.generate(self, prompt, max_new_tokens, on_text, cache=cache, stop=stop,
                               layer_schedule=layer_schedule)
