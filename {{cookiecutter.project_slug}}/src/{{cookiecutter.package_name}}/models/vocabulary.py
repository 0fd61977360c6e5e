"""A built-in word-level vocabulary and prompts for the offline default: nothing to download.

The words mix neutral film-review vocabulary with words that the VADER sentiment lexicon scores
as positive or negative, so a random policy produces text of mixed sentiment and learning to
please the offline sentiment reward is visible within a few minutes on a CPU.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS, UNK = "<eos>", "<unk>"

NEUTRAL = """
the a an this that it is was were be been and but or so then of in on at to for with from by as
movie film story plot actor actress director scene scenes script ending music camera cast role
character characters audience screen time year years people man woman family friend city night
day house world life war music sound book series show part moment minutes hours end first second
one two three some many much more most very really quite too just also still again ever never
i you he she we they his her their my our me him them what who when where why how which there here
think feel saw seen watch watched watching made make makes look looks looked seems seemed felt
""".split()

POSITIVE = """
good great excellent wonderful amazing brilliant beautiful best love loved lovely enjoy enjoyed
fun funny happy perfect superb fantastic awesome nice fine charming delightful masterpiece
inspiring impressive powerful favorite recommend win glad pleasant sweet
""".split()

NEGATIVE = """
bad awful terrible horrible worst boring hate hated poor stupid waste dull ugly sad disappointing
disappointed annoying weak mess pathetic ridiculous lame painful worse fail failed angry
""".split()

TRAIN_PROMPTS = [
    "the movie was",
    "this film is",
    "i think the plot",
    "the actor was",
    "the ending of this story",
    "we watched the film and",
    "the music in this movie",
    "my family saw the show and",
    "the director made",
    "the script was",
    "i feel that the cast",
    "the characters in this film",
    "this series is",
    "the first scene was",
    "people who watch this movie",
    "the camera and the music",
]

VAL_PROMPTS = [
    "the story is",
    "i watched this movie and",
    "the actress was",
    "this show was",
    "the film made me",
    "the second scene",
    "our friend saw it and",
    "the cast and the director",
]


def vocabulary() -> list[str]:
    words = list(dict.fromkeys(NEUTRAL + POSITIVE + NEGATIVE))  # dedupe, keep order
    return [EOS, UNK, *words]


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    vocab = {word: i for i, word in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tokenizer.to_str()


def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `vocabulary()`; EOS doubles as padding, padding on the left."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        padding_side="left",
    )
    tokenizer.model_max_length = 64
    return tokenizer
