"""requests.py: chat-formatted requests and their private positions."""

from vllm_kvshield import data
from vllm_kvshield.attack.requests import chat_request, conversations, single_requests


def test_private_positions_are_exactly_the_user_message(public):
    tok = public.tokenizer
    prompts = data.private_prompts()[:5]
    for prompt, req in zip(prompts, single_requests(tok, prompts)):
        assert tok.decode([req.tokens[i] for i in req.private]).strip() == prompt.strip()
        assert req.private == list(range(req.private[0], req.private[-1] + 1))
        header = tok.decode(req.header)
        assert header.startswith("<|im_start|>system") and prompt[:10] not in header
        rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        assert req.tokens == tok.encode(rendered, add_special_tokens=False)


def test_conversations_are_long_enough_and_use_each_prompt_once(public):
    tok = public.tokenizer
    prompts = data.private_prompts()
    convs = conversations(tok, prompts, 384)
    assert convs and all(len(c.tokens) >= 384 for c in convs)
    used = "".join(tok.decode([c.tokens[i] for i in c.private]) for c in convs)
    assert sum(p in used for p in prompts) >= len(prompts) - 6
    assert len(chat_request(tok, prompts[:2]).private) > len(chat_request(tok, prompts[:1]).private)
