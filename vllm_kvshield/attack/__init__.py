"""The attack harness: recover prompts from the KV blocks a real vLLM engine holds, per shield mode.

    kvshield attack --modes none,permute,mix-v,mix --out benchmarks/results

The attacker reads the engine's cache tensors (with the block table, as a memory
dump would) and knows the public checkpoint and tokenizer, never the key. Attack
families, each a class with recover(Observation) -> token guesses:

    direct.DirectInversion          1. layer-0 K/V nearest neighbour over the vocabulary
    invariant.PermutationInvariant  2. sorted values / rotary pair norms, any head order
    moments.CentredPairNorms        3. centred log pair norms (mode mix-v's K)
    known_plaintext.KnownPlaintext  4. fit the layer transform on the first n tokens, undo it
    kvcloak.KVCloakInversion        5. KV-Cloak's inversion (least squares to the layer input)
    kvcloak.KVCloakCollision        5. KV-Cloak's collision (public model forward, token by token)

runner.run drives them against vllm.LLM engines; report.write_report writes the results.
"""

from .observation import NO_GUESS, Attack, Observation

__all__ = ["NO_GUESS", "Attack", "Observation"]
