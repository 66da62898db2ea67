"""Built-in demo corpus: a deterministic generator of simple children's stories.

Each story is assembled from a small cast (a main character, a helper, an object,
a place, ...) and one scenario that runs through the stages
problem -> reaction -> attempt -> help -> resolution -> ending -> moral.
All text is original template text; nothing is downloaded.

Templates are ``str.format`` strings.  Values may themselves contain placeholders
(e.g. ``"{P} mom"``), so rendering repeats until no brace is left.  Sentence starts
are capitalised in one final pass, so templates can begin with ``{S}`` ("she").
"""

from __future__ import annotations

import os
import random
import re
import tempfile

__all__ = ["DEMO_CORPUS_VERSION", "generate_story", "generate_stories", "write_demo_corpus"]

DEMO_CORPUS_VERSION: int = 1  # bump whenever the generated text changes


def _words(text: str) -> list[str]:
    return text.split()


def _t(text: str) -> list[str]:
    """Split a block of templates separated by "|" or newlines."""
    return [p.strip() for line in text.splitlines() for p in line.split("|") if p.strip()]


def _rows(text: str) -> list[list[str]]:
    """Rows separated by "|", fields by ";"; line breaks count as spaces."""
    return [[" ".join(f.split()) for f in row.split(";")] for row in text.split("|")]


def _sections(text: str) -> dict[str, list[str]]:
    """Parse "## key" markers (at line starts), each followed by templates as in _t."""
    parts = re.split(r"^## (\S+)", text, flags=re.M)
    return {key: _t(body) for key, body in zip(parts[1::2], parts[2::2])}


def _a(phrase: str) -> str:
    """Indefinite article; word lists avoid 'u' = /ju/ and silent 'h' words."""
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


# ---------------------------------------------------------------- cast ----
GIRL_NAMES = _words("Lily Mia Emma Sara Anna Lucy Ruby Ella Zoe Rosa Maya Nora Ivy Daisy"
                    " Hannah Kate Amy Grace Molly Jenny Clara Poppy Wendy Tara")
BOY_NAMES = _words("Tom Ben Max Leo Jack Finn Toby Oliver Jake Noah Liam Peter Timmy Danny"
                   " Oscar Hugo Eli Ned Owen Felix Theo Adam Ravi Omar")
KID_NAMES = _words("Sam Alex Robin Jamie Riley Kit Charlie Jo Rowan Pat River Quinn")
PET_NAMES = _words("Pip Bo Coco Nutmeg Pebble Button Biscuit Sunny Twig Berry Fluff Rocky"
                   " Dot Hazel Clover Muffin Pepper Ziggy Bramble Acorn")

# subject, object, possessive, past of "to be"
PRONOUNS = {"f": ("she", "her", "her", "was"), "m": ("he", "him", "his", "was"),
            "n": ("they", "them", "their", "were")}
HUMAN_KINDS = {"f": ["little girl", "girl", "young girl"], "m": ["little boy", "boy", "young boy"],
               "n": ["child", "little kid", "young child"]}
TRAITS = _words("curious brave shy happy clever gentle kind cheerful friendly playful busy quiet eager")
HUMAN_HOMES = _t("""in a small house near the woods | in a yellow house by the sea
in a little town with a big clock | on a farm with lots of cows and sheep | in a tall building in the busy city
in a quiet village at the foot of a hill | in a blue house at the end of a long road
in a cozy cottage with a red roof""")
ANIMALS = _rows("""rabbit; in a cozy burrow under an old oak tree | fox; in a warm den at the edge of the forest |
mouse; in a tiny hole behind the kitchen wall | bear; in a big cave on the side of a hill |
duck; by a quiet pond near the farm | squirrel; in a tall tree in the middle of the park |
puppy; in a red house with a green door | kitten; in a warm house on a busy street |
bird; in a round nest high in an apple tree | frog; on a lily pad in a sunny pond |
pig; in a muddy pen on a big farm | elephant; in a wide, sunny valley |
hedgehog; under a pile of leaves in a garden | lamb; in a green field full of flowers""")
ACTIVITIES = _t("""play in the garden | sing happy songs | draw pictures | run in the tall grass | look at the stars
build towers with blocks | jump in puddles | read books about the sea | pick flowers | dance in the sun
climb little hills | watch the clouds | play hide and seek | bake cookies | count the birds | make mud pies
help in the garden""")
PLACES = _rows("""the park; in the park | the beach; on the beach | the forest; in the forest |
the garden; in the garden | the meadow; in the meadow | the farm; on the farm | the lake; by the lake |
the big hill; on the big hill | the playground; at the playground | the river; by the river |
the field behind the school; in the field behind the school""")
SEASONS = [  # (time openers, weather sentences that fit them)
    (["One bright spring morning", "One fine spring day"],
     ["The flowers were blooming, and the birds were singing.",
      "The grass was green and soft, and the air smelled sweet."]),
    (["On a warm summer day", "One hot summer afternoon"],
     ["The sun was shining high in the sky.", "It was so hot that even the bees were sleepy."]),
    (["One windy autumn day", "One cool autumn morning"],
     ["Red and yellow leaves danced in the wind.",
      "The trees were orange and gold, and leaves covered the ground."]),
    (["One cold winter morning", "One snowy winter day"],
     ["Snow covered the ground like a soft white blanket.",
      "The air was cold, so {S} wore {P} warm scarf and mittens."]),
    (["One day", "One morning", "One afternoon"],
     ["The sky was blue, and fluffy white clouds floated by.", "It was a lovely day to play outside."]),
]
COLORS = _words("red blue green yellow orange purple pink shiny little big new bright")
PLURAL_NOUNS = ("crayons", "marbles", "blocks", "cookies")
# noun; scenarios it fits; own adjectives (optional)
OBJECTS = _rows("""kite; stuck lost broken share wish | ball; stuck lost water share wish |
toy boat; water lost broken share wish | teddy bear; lost water share wish; brown soft fluffy old little big |
balloon; stuck share wish | hat; stuck lost water wish | toy car; lost broken share wish |
toy train; lost broken share wish | drum; broken share wish | doll; lost water share wish |
crayons; lost broken share wish | marbles; lost share wish | blocks; lost share wish |
book; lost water share wish | umbrella; stuck lost wish | scarf; stuck lost water wish |
bike; broken share wish | bucket; water lost broken share wish | shell; lost share; pretty pink white tiny shiny |
cookies; share; chocolate sweet warm oatmeal sugar""")
HIGH_SPOTS = _t("""in a tall tree | on the roof of an old shed | in the branches of a big oak | on top of a high wall
at the very top of a pine tree""")
WATERS = {"the lake": "the lake", "the river": "the river", "the beach": "the sea"}  # water at a place
# helpers: first mention; later mention; how they are addressed; gender (- = random); reach up; wade in
FAMILY = _rows("""{P} mom; {P} mom; Mom; f; got a tall ladder from the shed and climbed up;
    took off {hP} shoes and stepped into the shallow water |
{P} dad; {P} dad; Dad; m; lifted {Name} up onto {hP} shoulders; rolled up {hP} pants and waded into the water |
{P} grandma; {P} grandma; Grandma; f; found a long pole with a hook on the end;
    reached out with {hP} long walking stick |
{P} grandpa; {P} grandpa; Grandpa; m; reached up with a long pole from the shed;
    reached out with {hP} old fishing net""")
CREATURES = _rows("""a wise old owl; the owl; Owl; -; flew up on {hP} big wings; swooped down over the water |
a tall giraffe; the giraffe; Giraffe; -; stretched {hP} long neck up high; bent {hP} long neck down to the water |
a friendly duck; the duck; Duck; -; flapped up as high as {hS} could; swam out across the water |
a clever monkey; the monkey; Monkey; -; climbed up quickly; hung from a branch and reached down |
a big brown bear; the bear; Bear; -; stood up tall on {hP} back legs; splashed into the water |
a gentle elephant; the elephant; Elephant; -; reached up with {hP} long trunk;
    reached out with {hP} long trunk |
a helpful squirrel; the squirrel; Squirrel; -; scampered up in a flash; ran along a floating log""")
SKILLS = _rows("""ride a bike; wobbled and fell over; rode all the way down the path without falling |
swim; splashed and swallowed some water; swam all the way across the pond |
climb the big hill; got tired and sat down halfway up;
    stood at the top of the big hill and looked at the whole town |
whistle; only made a funny puff of air; whistled a happy little tune |
jump rope; tripped over the rope and landed on {P} knees; jumped twenty times in a row |
tie {P} shoes; got the laces all tangled up; tied two perfect bows |
bake a cake; burned the cake until it was black; baked a sweet, round cake with pink frosting |
read a whole book; got stuck on the long words; read the whole book out loud to {P} family |
catch a ball; dropped the ball every time; caught the ball ten times in a row |
build a sand castle; made the walls too thin, and they fell down; built a tall sand castle with four towers""")
# event; what is feared; what the helper explains
FEARS = _rows("""One night, dark clouds rolled in, and thunder boomed across the sky.; the thunder;
    thunder is just a big noise from the clouds, and it cannot hurt anyone |
One night, the lights went out, and the whole house was dark.; the dark;
    the dark is just the night, and everything in the room is still the same |
That night, a strange noise came from the window: tap, tap, tap.; the noise;
    it was only a little branch knocking on the glass |
One afternoon, a big dog came running and barking toward {O}.; big dogs;
    the dog was only saying hello and wanted to play |
One night, the wind howled around the house like a hungry wolf.; the wind;
    the wind was only singing its loud night song |
At bedtime, {S} saw a long, dark shadow on the wall.; shadows; the shadow was only {P} coat hanging by the door |
On the first day at the new school, {Name} did not know anyone.; new places;
    everyone feels shy on the first day, and new friends are waiting to be found""")

# ----------------------------------------------------------- templates ----
# Each "## key" starts a list of templates separated by "|" or newlines.  Keys named
# "<scenario>.<stage>" belong to one scenario; the others are shared.
TEMPLATES = _sections('''
## intro Once upon a time, there was {a_tkind} named {Name}. | Once there was {a_kind} called {Name}.
There once was {a_tkind} named {Name}. | In a land far away, there lived {a_tkind} named {Name}.
This is a story about {a_tkind} named {Name}. | Not long ago, there was {a_kind} named {Name}.
{Name} was {a_tkind}.
## trait {S} loved to {activity}. | More than anything, {Name} liked to {activity}.
Every day, {S} would {activity}. | {Name} was always {trait2} and loved to {activity}.
{Name}'s favorite thing to do was to {activity}.
When the sun was up, {Name} liked to {activity} with {P} friends.
{S} had many friends, and {S} liked to {activity} with them.
## home {S} lived {home}. | {Name} and {P} family lived {home}. | {Name} lived {home} with {P} mom and dad.
{Name} had a happy life {home}. | Home for {Name} was {home}. | {S} lived {home} with {P} big family.
## outing {time}, {Name} went to {place}. | {time}, {Name} and {P} friends went to play {at_place}.
{time}, {S} decided to go to {place}. | {time}, {Name} walked to {place} to play.
{time}, {Name} ran all the way to {place}. | {time}, {Name} went out to play {at_place}.
{time}, {Name}'s family took a trip to {place}.
## have_obj {S} brought {P} {adj_obj} with {O}. | {Name} had {a_obj} that {S} loved very much.
{S} took along {P} {adj_obj}, which {owas} a gift from {P} grandma.
{Name} carried {P} {adj_obj} everywhere {S} went.
{S} had {a_obj} with {O} and played with {iO} all the time.
"Look at my {adj_obj}!" {Name} said to everyone {S} met.
On the way, {Name} found {a_obj} on the ground and decided to keep {iO}.
## sad "Oh no! My {noun}!" {Name} cried. | "Come back!" {S} shouted.
{Name} felt very sad. "What will I do now?" {S} said. | {S} sighed. "Not my {noun}," {S} said softly.
Tears filled {Name}'s eyes. "This is the worst day ever," {S} said quietly.
"Why did this happen to me?" {Name} asked.
## arrive Just then, {H} came by. | Soon, {H} saw {Name} and came over.
{H} heard {O} and came to see what was wrong. | After a while, {H} walked over. | Luckily, {H} was nearby.
Then {H} came along. | A moment later, {H} appeared.
## offer "What is wrong, {Name}?" {hS} asked. | "Why are you so {mood}?" asked {hdef}.
"Don't worry, I will help you," {hS} said. | "Let me help," said {hdef}.
"I think I can help," {hS} said with a smile. | "Hello, {Name}. You look {mood}," {hS} said.
"Can I help?" {hS} asked kindly.
## thanks "Thank you!" {Name} said. | "Thank you so much, {haddr}!" said {Name}.
{Name} gave {hdef} a big hug. "You are the best," {S} said. | "Hooray!" shouted {Name}.
"Thank you for helping me, {haddr}," {Name} said with a big smile.
{Name} jumped for joy. "Thank you, thank you!" {S} cried. | "You are so kind, {haddr}," said {Name}.
## end_day {Name} went home with a big smile on {P} face.
That night, {Name} fell asleep feeling happy and warm. | {Name} felt happy for the rest of the day.
{S} played until the sun went down. | It was the best day ever.
When {S} got home, {S} told everyone about {P} day.
From then on, {Name} and {hdef} were the best of friends.
## end_obj {Name} held {the_obj} close and did not let {iO} go again.
That night, {S} slept with {the_obj} right next to {O}. | {S} played with {the_obj} all afternoon.
{Name} promised to take good care of {the_obj}. | {Name} smiled and hugged {the_obj}.
{Name} put {the_obj} in a safe place at home.
## moral_help {Name} learned that it is okay to ask for help. | {Name} learned that friends help each other.
Sometimes a little help is all you need. | {Name} never forgot how good it felt to be helped.
{Name} learned that a kind heart can fix almost anything.
And from that day on, {Name} always helped others too. | {Name} learned to take good care of {P} things.
From then on, {Name} was always careful with {P} toys.
## wish_intro In the window of the toy shop, {Name} saw {a_obj}.
{Name}'s friend had {a_obj}, and {Name} wanted {one} too.
{Name} wished for {a_obj} every night before bed. | At the market, {Name} saw {a_obj} and stopped to look.
"I wish I had {a_obj}," {Name} said with a sigh. | More than anything, {Name} wanted {a_obj}.
## wish_say "Someday {iS} will be mine," {Name} said. | "Please, can I have {iO}?" {Name} asked {P} mom.
"If only {iS} could be mine," {Name} whispered. | {Name} thought about {the_obj} all day long.
{S} could not stop thinking about {iO}. | "I will find a way," {Name} said with a brave nod.
## explain_fear "I am afraid of {fear}," {Name} said. | {Name} whispered, "I don't like {fear}."
{Name} told {hO} all about {fear}. | "Will {fear} hurt me?" {Name} asked.
"I feel so small and scared," {Name} said in a tiny voice.
{Name} pointed and said that {S} did not like {fear}.
## learn_intro {Name} wanted to learn to {goal} more than anything.
{Name} had a wish. {S} wanted to {goal}. | "I wish I could {goal}," {Name} said one day.
All of {P} friends could {goal}, but {Name} could not. | Every night, {Name} dreamed that {S} could {goal}.
{Name}'s big dream was to {goal}.
## stuck.problem A strong wind blew, and {the_obj} got stuck {spot}.
{S} threw {the_obj} too high, and {iS} landed {spot}.
Suddenly, a gust of wind came, and {the_obj} {owas} caught {spot}.
Whoosh! The wind took {the_obj}, and soon {iS} {owas} stuck {spot}.
{Name} tossed {the_obj} up high, but {iS} came down {spot} and stayed there.
Oh no! {the_obj} bounced away and got stuck {spot}.
## stuck.attempt {S} jumped as high as {S} could, but {S} {was} too small.
{Name} tried to climb up, but {S} slipped and fell on the soft grass.
{S} threw a stick, but {the_obj} did not move.
{Name} stood on {P} tiptoes and reached up, but {the_obj} {owas} still too high.
{Name} called to {the_obj} to come down, but of course nothing happened.
{S} found a long stick and tried to poke {iO} down, but the stick was too short.
## stuck.resolve {hdef} {reach} and got {the_obj} down.
With a smile, {hdef} {reach}. Soon {the_obj} {owas} safe in {Name}'s hands.
{hdef} {reach}, and a moment later {iS} {owas} back on the ground.
Slowly and carefully, {hdef} {reach} and brought {the_obj} back.
{hdef} {reach}, grabbed {the_obj}, and gave {iO} back to {Name}.
"Watch this," said {hdef}. Then {hS} {reach} and got {the_obj} back.
## lost.problem When it was time to go home, {Name} could not find {the_obj} anywhere.
{S} put {the_obj} down to pick some flowers, and when {S} turned around, {iS} {owas} gone.
After lunch, {Name} looked for {the_obj}, but {iS} {owas} not there. | Somehow, {the_obj} went missing.
{Name} left {the_obj} on a bench for just a moment, and then {iS} {owas} gone.
On the way home, {the_obj} fell out of {Name}'s bag, but {S} did not see it happen.
## lost.attempt {S} looked under the bushes, behind the trees and next to the path.
{Name} searched everywhere, but {S} could not find {iO}.
{S} walked back the way {S} came, looking left and right.
{Name} looked under the benches and in the tall grass, but there was nothing.
{S} called out, but of course {the_obj} could not answer. | {S} looked and looked until {P} legs were tired.
## lost.resolve {hdef} had a good idea. They looked by the old well, and there {owas} {the_obj}!
{hdef} pointed at a bush. Under the leaves, {the_obj} {owas} waiting.
{hdef} looked very carefully, and soon {hS} found {the_obj} behind a big rock.
{hdef} remembered seeing something by the gate. Sure enough, {the_obj} {owas} right there.
They looked together, and {hdef} spotted {the_obj} under a pile of leaves.
{hdef} helped {O} look in every corner, and at last they found {the_obj} near a big tree.
## broken.problem {the_obj} fell on the hard ground and broke. | {Name} dropped {the_obj}, and {iS} cracked.
A big dog ran by and knocked {the_obj} over, and {iS} broke into pieces.
{S} played too hard, and {the_obj} broke. | Crack! {the_obj} hit a rock and broke.
{S} stepped on {the_obj} by mistake, and {iS} broke.
## broken.attempt {S} tried to put the pieces back together, but they would not stay.
{Name} tried to fix {iO} with some tape, but the tape would not stick.
{S} held the pieces in {P} hands and did not know what to do.
{Name} tried very hard to fix {iO}, but {S} could not do it alone.
{S} pushed the broken parts together, but they fell apart again.
{S} sat down next to the pieces and tried to think of a plan.
## broken.resolve {hdef} got some glue and helped {O} fix {the_obj} piece by piece.
Together, {Name} and {hdef} worked slowly until {the_obj} looked almost new.
{hdef} showed {Name} how to fix {iO} with glue and string.
{hdef} fixed {the_obj} in no time, and {Name} watched and learned.
With a little glue and a lot of patience, {hdef} and {Name} made {the_obj} as good as new.
{hdef} said that almost anything can be fixed with love and glue. Soon {the_obj} {owas} whole again.
## water.problem {the_obj} slipped from {Name}'s hands and fell into {water}.
Splash! {the_obj} fell into {water} and began to float away.
A big wave came and carried {the_obj} out into {water}.
{Name} leaned over the edge of {water}, and {the_obj} dropped in.
{S} {was} not careful, and {the_obj} landed in the middle of {water}.
The wind pushed {the_obj} into {water}, and {iS} drifted away from the shore.
## water.attempt {S} reached out with a stick, but {the_obj} {owas} too far away.
{Name} wanted to jump in, but the water was deep and cold.
{S} waited at the edge, hoping {iS} would float back.
{Name} threw small stones near {the_obj} to push {iO} back, but it did not work.
{S} ran along the shore, but {the_obj} kept drifting away. | {S} called for help, but at first nobody came.
## water.resolve {hdef} {wade} and brought {the_obj} back to the shore.
{hdef} {wade}. A moment later, {the_obj} {owas} safe on the grass.
Using a long net, {hdef} scooped {the_obj} out of the water.
{hdef} {wade}, grabbed {the_obj}, and gave {iO} back to {Name}.
{hdef} found a long branch and pulled {the_obj} gently to the edge.
Slowly, {hdef} {wade} and pushed {the_obj} back toward {Name}.
## share.problem Soon {P} friend {Fname} came over and wanted to play with {the_obj} too.
Then {P} friend {Fname} came by. "Can I play with your {noun}?" {fS} asked.
{P} friend {Fname} saw {the_obj} and said, "I want to play with {iO}!"
Just then, {P} friend {Fname} ran up and grabbed {the_obj}.
{Fname}, who lived next door, asked if {fS} could have a turn.
{Name}'s friend {Fname} wanted {the_obj} all for {fO}.
## share.react "No, {iS} {ois} mine!" {Name} said. | "But I want to play with {iO} now," {Name} said.
{Name} held {the_obj} tight and did not want to let go. | {Name} frowned. "I had {iO} first," {S} said.
They both pulled and pulled, and neither one would let go.
"Go away, {Fname}," {Name} said, and {Fname} looked very sad.
## share.attempt {Fname} started to cry, and {Name} felt a funny feeling in {P} tummy.
Soon both of them were sad, and nobody was having any fun. | They argued until the sun went behind a cloud.
{Fname} walked away and sat alone on a rock.
{Name} played alone, but it was not much fun without a friend.
The two friends did not talk to each other for a long time.
## share.resolve {Name} thought for a moment. Then {S} held out {the_obj} and said, "Let's play together."
After a while, {Name} walked over to {Fname} and said, "I'm sorry. You can have a turn."
{Name} remembered that {P} mom always said sharing is kind, so {S} gave {Fname} a turn.
{Name} took a deep breath. "We can take turns," {S} said, and {Fname} smiled.
{Name} saw how sad {Fname} was, and {S} decided to share.
"You go first," {Name} said, and {S} gave {the_obj} to {Fname}.
## share.end {Name} and {Fname} played together all afternoon.
They took turns, and soon they were laughing together.
Playing together was much more fun than playing alone. | {Name} and {Fname} became the best of friends.
By the end of the day, {Name} and {Fname} had made up a brand new game.
{Fname} smiled, and {Name} felt warm inside.
## share.moral {Name} learned that sharing makes everyone happy.
Sharing is caring, and {Name} never forgot it. | {Name} learned that toys are more fun with a friend.
From that day on, {Name} always shared {P} toys.
{Name} learned that being kind is better than being first.
Friends are more important than toys, and now {Name} knew it.
## wish.problem But {iS} cost five coins, and {Name} had none.
But {Name} did not have enough money to buy {iO}. | The shopkeeper said that {iS} cost more than {S} had.
But {P} piggy bank was empty. | But {Name} had only one small coin.
But {P} mom said that {S} would have to wait.
## wish.attempt So {Name} helped {P} neighbors to earn some coins.
{S} watered the flowers and swept the floor to earn a few coins.
Every day, {S} saved one shiny coin in {P} jar.
{Name} sold lemonade at a little stand in front of {P} home.
{S} fed the chickens and washed the dishes without being asked.
{Name} tried to make {one} all alone, but {iS} did not look right.
## wish.resolve After many days, {S} had enough coins, and {S} bought {the_obj}.
{H} saw how hard {Name} worked and helped {O} buy {the_obj}.
On {P} birthday, {H} gave {O} a big box. Inside {owas} the very {noun} {S} had wanted!
{H} showed {Name} how to make {one} at home, and {iS} turned out even better than the {ones} in the shop.
At last, {Name} counted {P} coins, and there were just enough to buy {the_obj}.
The shopkeeper saw how hard {Name} had worked and gave {O} {the_obj} for just one coin.
## wish.react "I love {iO}!" {Name} said. | "This is the best day ever!" {Name} shouted.
{Name} jumped up and down with joy. | {Name} could hardly believe it.
"It was worth the wait," {Name} said happily. | {Name}'s eyes sparkled with joy.
## wish.moral {Name} learned that good things come to those who wait.
{Name} learned that hard work pays off. | {Name} learned that patience is a gift too.
Things we work for feel extra special. | {Name} learned that waiting is hard, but it is worth it.
And {Name} took good care of {the_obj} forever.
## learn.problem The first time {S} tried, {S} {fail}. | {S} tried very hard, but {S} {fail}.
{Name} tried again and again, but each time {S} {fail}. | On {P} first try, {Name} {fail}.
It was harder than it looked. {Name} {fail}. | {S} took a deep breath and tried, but {S} {fail}.
## learn.react "I will never be able to do it," {Name} said sadly. | "It is too hard!" {S} cried.
{Name} wanted to give up. | {Name} sat down. "Maybe I am just too little," {S} said.
{S} felt like crying, but {S} did not give up. | "Why is this so hard?" {Name} asked.
## learn.attempt Every day, {S} practiced a little more. | {S} got up and tried again, and again, and again.
{Name} practiced in the morning and in the evening. | Even when it was hard, {Name} kept trying.
{S} watched the others carefully to see how they did it.
Day after day, {S} tried, but it was still not easy.
## learn.resolve {hdef} showed {O} a little trick, and it helped a lot.
With {hdef} cheering {O} on, {Name} tried one more time. | {hdef} told {O} to go slowly and not be afraid.
{hdef} said, "Try again, and this time, believe in yourself." | {hdef} practiced with {O} every day.
{hdef} showed {O} how to do it one small step at a time.
## learn.success At last, {Name} {success}! | Then one day, {S} {success}.
This time, {Name} {success}, and {S} could not stop smiling. | Finally, {S} {success}!
And guess what? {Name} {success}! | Soon, {Name} {success}.
## learn.end {Name} felt very proud. | Everyone clapped and cheered for {Name}.
"I did it!" {Name} shouted. | {Name} could not wait to show {P} friends. | {Name} felt as tall as a tree.
That night, {Name} went to bed with a proud smile.
## learn.moral {Name} learned that if you keep trying, you can do hard things.
Practice makes things easier, one day at a time. | {Name} learned never to give up.
Now {Name} knew that everyone starts out slow. | {Name} learned that mistakes help us grow.
Little by little, hard things become easy.
## scared.react {Name} felt very scared. | "I am scared," {Name} whispered.
{Name}'s heart beat fast. {S} did not like {fear} at all. | "Help!" {Name} cried.
{S} closed {P} eyes tight and held {P} breath. | {Name} wanted to run away and hide.
## scared.attempt {S} tried to be brave and counted to ten, but it did not help.
{Name} sang a little song to feel better, but {P} voice was shaky.
{S} thought about happy things, like ice cream and sunny days.
{Name} took a deep breath, but {S} still felt afraid. | {S} tried to be brave, but {P} knees were shaking.
{Name} hugged {P} knees and sat very still.
## scared.resolve {hdef} gave {O} a warm hug and said that {truth}.
{hdef} sat down next to {O} and explained that {truth}. | Softly, {hdef} told {O} that {truth}.
{hdef} held {Name}'s hand and said that {truth}. | {hdef} smiled and told {O} that {truth}.
In a calm voice, {hdef} explained that {truth}.
## scared.end Soon {Name} felt calm, and {S} smiled again. | {Name} smiled, and {P} fear melted away.
{Name} felt safe and warm again. | After that, {Name} felt much braver.
{S} gave {hdef} a big hug and felt calm again. | {Name} giggled. It was not so scary after all.
## scared.moral {Name} learned that many scary things are not so scary after all.
Now {Name} was not afraid of {fear} anymore. | {Name} learned that it is okay to feel scared sometimes.
{Name} learned that talking about a fear makes it smaller. | Being brave does not mean you are never scared.
From then on, {Name} was a little braver every day.''')
SCENARIO_NAMES = ["stuck", "lost", "broken", "water", "share", "wish", "learn", "scared"]

# Capitalise the first letter of the story, of each sentence (also inside quotes),
# and of a quote opened after "said,".  A lowercase word right after '!"' or '?"'
# is a dialogue tag ("she asked") and stays lowercase.
_CAP_RE = re.compile(r'(^"?|[.!?] "?|\." |, ")([a-z])')


def _capitalise(text: str) -> str:
    return _CAP_RE.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def _render(template: str, v: dict[str, str]) -> str:
    text = template.format_map(v)
    while "{" in text:  # values such as "{P} mom" contain placeholders themselves
        text = text.format_map(v)
    return text


def _cast(rng: random.Random, scenario: str) -> dict[str, str]:
    """Choose every name, pronoun, object and place the story may mention."""
    if rng.random() < 0.55:  # a child
        gender = rng.choice(["f", "f", "m", "m", "n"])
        name = rng.choice({"f": GIRL_NAMES, "m": BOY_NAMES, "n": KID_NAMES}[gender])
        kind, home = rng.choice(HUMAN_KINDS[gender]), rng.choice(HUMAN_HOMES)
    else:  # an animal
        gender = rng.choice(["f", "m", "n"])
        name = rng.choice(PET_NAMES)
        animal, home = rng.choice(ANIMALS)
        kind = rng.choice(["little", "small", "young"]) + " " + animal
    s, o, p, was = PRONOUNS[gender]
    trait, trait2 = rng.sample(TRAITS, 2)
    v = {"Name": name, "S": s, "O": o, "P": p, "was": was, "kind": kind, "a_kind": _a(kind),
         "a_tkind": _a(trait + " " + kind), "trait2": trait2, "home": home,
         "activity": rng.choice(ACTIVITIES)}
    v["place"], v["at_place"] = rng.choice(PLACES)
    openers, weather = rng.choice(SEASONS)
    v["time"], v["weather"] = rng.choice(openers), rng.choice(weather)
    # the object (also used for wording in scenarios that do not need one)
    obj = rng.choice([ob for ob in OBJECTS if scenario in ob[1].split()] or OBJECTS)
    noun = obj[0]
    plural = noun in PLURAL_NOUNS
    adj_obj = rng.choice(_words(obj[2]) if len(obj) > 2 else COLORS) + " " + noun
    v.update(noun=noun, adj_obj=adj_obj, the_obj="the " + noun,
             a_obj=("some " + adj_obj) if plural else _a(adj_obj),
             iS="they" if plural else "it", iO="them" if plural else "it",
             owas="were" if plural else "was", ois="are" if plural else "is",
             one="some" if plural else "one", ones="ones" if plural else "one",
             spot=rng.choice(HIGH_SPOTS))
    v["water"] = WATERS.get(v["place"]) or rng.choice(["the pond", "the lake"])
    # the helper: family for night-time fears, anyone otherwise
    pool = FAMILY if scenario == "scared" else FAMILY + CREATURES
    first, later, addr, hgender, reach, wade = rng.choice(pool)
    hs, ho, hp, hwas = PRONOUNS[rng.choice(["f", "m"]) if hgender == "-" else hgender]
    v.update(H=first, hdef=later, haddr=addr, hS=hs, hO=ho, hP=hp, hwas=hwas, reach=reach, wade=wade,
             mood="scared" if scenario == "scared" else rng.choice(["sad", "upset", "worried"]))
    # a friend with a different name
    fgender = rng.choice(["f", "m"])
    friends = [n for n in (GIRL_NAMES if fgender == "f" else BOY_NAMES) if n != name]
    fs, fo, fp, _ = PRONOUNS[fgender]
    v.update(Fname=rng.choice(friends), fS=fs, fO=fo, fP=fp)
    v["goal"], v["fail"], v["success"] = rng.choice(SKILLS)
    v["fear_event"], v["fear"], v["truth"] = rng.choice(FEARS)
    return v


def generate_story(rng: random.Random) -> str:
    """Return one short story (a single paragraph) drawn from ``rng``."""
    return _story_and_cast(rng)[0]


def _story_and_cast(rng: random.Random) -> tuple[str, dict[str, str]]:
    scenario = rng.choice(SCENARIO_NAMES)
    v = _cast(rng, scenario)

    def pick(key: str) -> str:  # "." marks a scenario-specific stage
        return rng.choice(TEMPLATES[scenario + key if key.startswith(".") else key])

    out: list[str] = [pick("intro")]
    if rng.random() < 0.8:
        out.append(pick("trait"))
    out.append(pick("home"))
    if scenario in ("stuck", "lost", "broken", "water", "share"):
        out.append(pick("outing"))
        if rng.random() < 0.5:
            out.append("{weather}")
        out += [pick("have_obj"), pick(".problem")]
        if scenario == "share":
            out += [pick(".react"), pick(".attempt"), pick(".resolve"), pick(".end")]
        else:
            out += [pick("sad"), pick(".attempt"), pick("arrive"), pick("offer"), pick(".resolve"),
                    pick("thanks"), rng.choice(TEMPLATES["end_obj"] + TEMPLATES["end_day"])]
    elif scenario == "wish":
        out += [pick("wish_intro"), pick("wish_say"), pick(".problem"), pick(".attempt"), pick(".resolve"),
                pick(".react"), pick("end_obj")]
    elif scenario == "learn":
        out += [pick("learn_intro"), pick(".problem"), pick(".react"), pick(".attempt"), pick("arrive"),
                pick("offer"), pick(".resolve"), pick(".success"), pick(".end")]
    else:  # scared
        out += ["{fear_event}", pick(".react"), pick(".attempt"), pick("arrive"), pick("offer"),
                pick("explain_fear"), pick(".resolve"), pick(".end")]
    if rng.random() < 0.7:
        out.append(rng.choice(TEMPLATES.get(scenario + ".moral", TEMPLATES["moral_help"])))
    return _capitalise(" ".join(_render(t, v) for t in out)), v


REQUESTS = ("Tell me a story about {Name}, {a_kind}.", "Can you tell me a story about {a_kind} called {Name}?",
            "Please tell me a story about {Name}.", "I want a story about {a_kind} named {Name}.")
ANOTHER = ("Tell me another one, about {Name}.", "Now one about {a_kind} called {Name}, please.")


def generate_conversations(n: int, seed: int = 0) -> list[dict]:
    """Chat examples for fine-tuning the demo model: a request for a story about a named hero and
    the story; one in three asks for a second story in a second turn."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(n):
        messages = []
        for asks in (REQUESTS, ANOTHER)[:1 + (rng.random() < 1 / 3)]:
            story, cast = _story_and_cast(rng)
            messages += [{"role": "user", "content": rng.choice(asks).format(**cast)},
                         {"role": "assistant", "content": story}]
        conversations.append({"messages": messages})
    return conversations


def generate_stories(n_stories: int, seed: int = 0) -> list[str]:
    """Return ``n_stories`` stories; the same seed always gives the same list."""
    rng = random.Random(seed)
    return [generate_story(rng) for _ in range(n_stories)]


def write_demo_corpus(path: str | os.PathLike, *, target_bytes: int = 3_000_000, seed: int = 0,
                      separator: str = "\n\n") -> dict:
    """Write stories joined by ``separator`` until the file holds >= ``target_bytes``.

    The stories are the same sequence as ``generate_stories(n, seed)``.  The file
    is written to a temporary file in the same directory and moved into place
    atomically.  Returns ``{"path", "stories", "bytes", "seed"}``.
    """
    path = os.fspath(path)
    rng = random.Random(seed)
    separator_bytes = separator.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".demo_corpus.", suffix=".tmp", dir=directory)
    stories = total = 0
    try:
        with os.fdopen(fd, "wb") as fh:  # streamed: memory does not grow with target_bytes
            while total < target_bytes or not stories:
                story = generate_story(rng).encode("utf-8")
                if stories:
                    fh.write(separator_bytes)
                    total += len(separator_bytes)
                fh.write(story)
                total += len(story)
                stories += 1
        os.chmod(tmp, 0o644)  # mkstemp creates the file private (0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"path": path, "stories": stories, "bytes": total, "seed": seed}


def demo_config_values(corpus_path: str, run_dir: str) -> dict:
    """The demo's recipe for the generated corpus at `corpus_path` (`psannlm demo`, the bench suite)."""
    return {
        "model": {"base": "transformer", "d_model": 256, "n_layers": 4, "n_heads": 4},
        "data": {"train_files": [corpus_path], "doc_separator": "\n\n", "tokenizer": "tokenizers",
                 "tokenizer_vocab_size": 2048, "max_length": 128, "val_split": 0.02, "cache_dir": f"{run_dir}/data"},
        "train": {"max_steps": 260, "batch_tokens": 4096, "lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.1,
                  "eval_interval_steps": 130, "eval_batches": 20, "log_interval_steps": 25, "checkpoint_dir": run_dir},
        "generate": {"max_new_tokens": 80, "temperature": 0.8, "top_p": 0.95, "seed": 0},
    }
