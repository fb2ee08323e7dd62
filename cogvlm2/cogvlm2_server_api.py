"""The OpenAI chat-completions request as pydantic models, and its mapping onto an engine request.

Mapping (``to_engine_request``):
- messages alternate user / assistant and end with a user message; the earlier (user, assistant)
  pairs become the engine's ``history``, the last user message its ``text``. The model has no system
  prompt (its chat template is ``Question: ... Answer:``), so a system/developer message is refused.
- one video (``video_url``) or picture (``image_url``) per conversation, in any user message: the
  chat template puts the frames before the whole conversation, as the official demo does.
- ``temperature`` 0 is greedy; > 0 samples with that temperature and ``top_p`` (no top-k filter, as
  OpenAI has none); left out, the config's generation settings apply (greedy in the shipped YAMLs).
  ``max_completion_tokens`` (or the older ``max_tokens``), ``seed`` map one to one; ``stop`` strings
  are applied by the server on the decoded text; ``n`` must be 1.
Unknown fields are refused (422 naming them) rather than silently ignored.
"""
from typing import Annotated, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ChatCompletionRequest", "FramesRequest", "EngineRequest", "RequestError", "to_engine_request"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MediaURL(_Strict):
    url: str
    detail: Optional[str] = None              # accepted for image_url compatibility; the model has one size


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: MediaURL


Part = Annotated[Union[TextPart, VideoPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[Part]]
    name: Optional[str] = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: Optional[str] = None
    messages: List[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = Field(default=None, ge=0)
    stop: Union[str, List[str], None] = None
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # accepted only at their neutral value (anything else would be silently ignored)
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logprobs: Optional[bool] = None


class FramesRequest(_Strict):
    """POST /v1/frames: which frames the model looks at for this media (for the web page)."""
    url: str
    type: Literal["video", "image"] = "video"


class RequestError(Exception):
    """A request the OpenAI format allows but this model cannot serve: 400 naming ``param``."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class EngineRequest:
    """What ``CogVLM2Engine.submit`` needs, plus the server-side stop strings."""

    def __init__(self, text: str, history: List[Tuple[str, str]], media_url: Optional[str],
                 media_kind: Optional[str], media_param: Optional[str], options: dict, stop: List[str]):
        self.text, self.history = text, history
        self.media_url, self.media_kind, self.media_param = media_url, media_kind, media_param
        self.options, self.stop = options, stop


def _split(message: Message, index: int):
    """(text, [(kind, url, param)]) of one message."""
    if isinstance(message.content, str):
        return message.content, []
    texts, media = [], []
    for j, part in enumerate(message.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, VideoPart):
            media.append(("video", part.video_url.url, f"messages[{index}].content[{j}].video_url.url"))
        else:
            media.append(("image", part.image_url.url, f"messages[{index}].content[{j}].image_url.url"))
    return "".join(texts), media


def _generation_options(request: ChatCompletionRequest) -> dict:
    if request.n not in (None, 1):
        raise RequestError(f"n={request.n}: this server returns one choice per request; send n=1 (or "
                           "several requests)", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name) not in (None, 0):
            raise RequestError(f"{name} is not supported (only 0)", name)
    if request.logprobs:
        raise RequestError("logprobs are not supported", "logprobs")
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise RequestError(f"max_tokens={request.max_tokens} and max_completion_tokens="
                           f"{request.max_completion_tokens} differ; give one", "max_completion_tokens")
    options = {}
    limit = request.max_completion_tokens or request.max_tokens
    if limit is not None:
        options["max_new_tokens"] = limit
    if request.temperature is not None:
        if request.temperature == 0:
            options["do_sample"] = False
        else:
            options.update(do_sample=True, temperature=request.temperature, top_k=0,
                           top_p=1.0 if request.top_p is None else request.top_p)
    elif request.top_p is not None:
        options["top_p"] = request.top_p
    if request.seed is not None:
        options["seed"] = request.seed
    return options


def _stop_strings(stop) -> List[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise RequestError("stop takes at most 4 non-empty strings", "stop")
    return stops


def to_engine_request(request: ChatCompletionRequest) -> EngineRequest:
    """Check the conversation's shape and map it onto one engine request (media still a URL)."""
    messages = request.messages
    for i, message in enumerate(messages):
        if message.role in ("system", "developer"):
            raise RequestError(f"messages[{i}]: CogVLM2-Video has no system prompt (its chat template is "
                               "'Question: ... Answer:'); put the instruction into the user message",
                               f"messages[{i}].role")
        wanted = "user" if i % 2 == 0 else "assistant"
        if message.role != wanted:
            raise RequestError(f"messages[{i}] is a {message.role} message where a {wanted} message belongs: "
                               "messages alternate user, assistant, user, ... and end with a user message",
                               f"messages[{i}].role")
    if messages[-1].role != "user":
        raise RequestError("the last message must be the user's question", f"messages[{len(messages) - 1}].role")
    texts, media = [], []
    for i, message in enumerate(messages):
        text, found = _split(message, i)
        if message.role == "assistant" and found:
            raise RequestError(f"messages[{i}]: an assistant message holds text only", f"messages[{i}].content")
        texts.append(text)
        media += found
    if len(media) > 1:
        raise RequestError(f"{len(media)} videos/images in the conversation; the model looks at one per "
                           "conversation", media[1][2])
    history = [(texts[i], texts[i + 1]) for i in range(0, len(texts) - 1, 2)]
    kind, url, param = media[0] if media else (None, None, None)
    return EngineRequest(texts[-1], history, url, kind, param, _generation_options(request),
                         _stop_strings(request.stop))
