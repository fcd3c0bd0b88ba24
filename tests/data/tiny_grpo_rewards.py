"""Reward function for the Axolotl ``rl: grpo`` test, named in its config by module path
(``trl.reward_funcs: [tiny_grpo_rewards.vowel_share]``; the test puts this folder on ``sys.path``,
as ``axolotl train`` finds reward modules in the current directory)."""


def vowel_share(prompts, completions, **kwargs):
    """A reward with a spread across a group's completions: the share of vowels in each one."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]
