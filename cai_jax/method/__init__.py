"""The method's shared pieces, where a reader of the paper looks for them: the constitution and
the prompts it renders, conversations, the prompt data, comparisons and AI labels, the preference
model, the PPO math and Elo. Every stage builds on these; none of them knows a stage."""
