"""The attack harness: recover prompts from the KV blocks a real vLLM engine holds, per shield mode.

    kvshield attack --modes none,permute,mix-v,mix --out benchmarks/results

The attacker reads the engine's cache tensors (with the block table, as a memory
dump would) and knows the public checkpoint, tokenizer, chat template and the shield's
design (observation.Layout: what it knows of where rows sit), never the key. Attack
families, each a class with recover(Observation) -> token guesses per position (the
pooled ones also recover_pool(observations)):

    direct.DirectInversion          1. layer-0 K/V nearest neighbour over the vocabulary
    invariant.PermutationInvariant  2. sorted values / rotary pair norms, any head order
    moments.CentredPairNorms        3. centred log pair norms (mode mix-v's K)
    known_plaintext.KnownPlaintext  4. fit the layer transform on the first n tokens, undo it
    kvcloak.KVCloakInversion        5. KV-Cloak's inversion (least squares to the layer input)
    kvcloak.KVCloakCollision        5. KV-Cloak's collision (public model forward, token by token)
    template.TemplateBootstrap      6. the chat template's tokens as anchors, fit, decode, refit (bootstrap.py)
    chosen_plaintext.ChosenPlaintext 7. the attacker's own requests fit the transform (client of the server)
    frequency.EqualityFrequency     8. equal layer-0 V rows ranked against a public token prior, then bootstrap
    bootstrap.Bootstrap             9. known tokens of the victim's own request, bootstrapped (any layout)

kvcloak_dump writes our blocks in KV-Cloak's format for its own code (scripts/kvcloak_attack.sh).

runner.run drives them against vllm.LLM engines; report.write_report writes the results.
"""

from .observation import NO_GUESS, Attack, Observation

__all__ = ["NO_GUESS", "Attack", "Observation"]
