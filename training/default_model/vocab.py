"""Word lists of the default model's synthetic chat task, each split into a training part and a held-out part.

Held-out items (the `HELDOUT_*` sets) never appear in a training conversation; the held-out evaluation in
`train.py` and the examples in the README and tests draw from them, so they measure copying of unseen words,
not memory of the training set.
"""
from __future__ import annotations


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


NAMES = _words("""
Aaron, Abdul, Abigail, Ada, Adam, Adele, Adrian, Agnes, Ahmed, Aiden, Aisha, Akira, Alan, Alba, Albert, Alejandro,
Alex, Alexander, Alexandra, Alfie, Ali, Alice, Alicia, Alina, Amara, Amelia, Amir, Amy, Ana, Anders, Andrea,
Andrew, Angela, Anika, Anita, Ann, Anna, Anton, Arjun, Arthur, Asha, Astrid, Aurora, Ava, Axel, Aya, Ayumi,
Barbara, Basil, Beatrice, Bella, Ben, Benjamin, Bernard, Bianca, Bilal, Blake, Boris, Brandon, Brenda, Brian,
Bruno, Caleb, Camila, Carl, Carla, Carlos, Carmen, Caroline, Carter, Catherine, Cecilia, Celine, Chen, Chidi,
Chloe, Chris, Christina, Claire, Clara, Connor, Cora, Craig, Cyrus, Daisy, Dalia, Damian, Daniel, Daniela,
Dante, Daria, David, Dawn, Dean, Deepak, Diana, Diego, Dmitri, Dominic, Dora, Dylan, Eddie, Edgar, Edith,
Eduardo, Elena, Eli, Elias, Eliza, Ella, Ellen, Elsa, Emil, Emily, Emma, Enzo, Eric, Erik, Esme, Esther,
Ethan, Eva, Evan, Ezra, Fatima, Felix, Fern, Finn, Fiona, Florence, Francesca, Frank, Freya, Gabriel, Gemma,
George, Georgia, Gianni, Gloria, Grace, Greta, Gustav, Hana, Hannah, Harper, Harry, Hassan, Hector, Heidi,
Helen, Henry, Hiro, Holly, Hugo, Ian, Ibrahim, Ida, Igor, Ilya, Imani, Ines, Irene, Iris, Isaac,
Isabel, Ivan, Ivy, Jack, Jacob, Jade, Jamal, James, Jana, Jane, Jasmine, Jason, Javier, Jay, Jean, Jenna,
Jessica, Jin, Joan, Joel, John, Jonas, Jordan, Jorge, Jose, Joseph, Joy, Juan, Julia, Julian, June, Kai,
Karim, Karina, Kate, Kenji, Kevin, Khalid, Kim, Kiran, Klaus, Kofi, Lana, Lara, Laura, Layla, Leah, Lena,
Leo, Leon, Liam, Lila, Lily, Lina, Linus, Lisa, Logan, Lola, Lorenzo, Louis, Lucas, Lucia, Lucy, Luis, Luka,
Luna, Maya, Madison, Magnus, Malik, Mara, Marco, Margaret, Maria, Marie, Marina, Mario, Mark, Martha, Martin,
Mateo, Matilda, Max, Mei, Mia, Michael, Miguel, Mila, Milan, Miles, Mina, Miriam, Molly, Monica,
Nadia, Naomi, Nasser, Natalia, Nathan, Neil, Nia, Nico, Nikhil, Nina, Noah, Noor, Nora, Olga, Olive, Oliver,
Olivia, Omar, Oscar, Owen, Pablo, Paolo, Patrick, Paul, Paula, Pedro, Penny, Peter, Petra, Philip, Pia,
Quentin, Rachel, Rafael, Rahul, Ravi, Raya, Rebecca, Reza, Rhys, Rita, Robert, Robin, Rosa, Rose, Ruby,
Rui, Ruth, Ryan, Sabrina, Sadie, Sam, Samir, Samuel, Sara, Sasha, Scott, Sean, Selma, Sergei, Simon, Sofia,
Sonia, Stella, Stefan, Sunil, Susan, Sven, Tara, Tariq, Teresa, Theo, Thomas, Tim, Tobias, Tom, Tomas,
Uma, Ursula, Valentina, Vera, Victor, Viktor, Vincent, Viola, Wendy, Will, William, Xavier, Yara, Yasmin,
Yuki, Yusuf, Zack, Zain, Zara, Zoe, Zora
""")
HELDOUT_NAMES = set(_words("""
Marcus, Priya, Sophie, Lukas, Ingrid, Mohammed, Tomasz, Keiko, Oluwaseun, Beatriz, Hamid, Svetlana, Declan,
Rosalind, Thabo, Mirela, Pieter, Anjali, Giulia, Fernando, Yosef, Ludmila, Kwame, Benedikt, Elif, Soren,
Valeria, Hiroshi, Cormac, Ximena, Dagny, Emeka, Leilani, Rashid, Tatiana, Wojciech, Ophelia, Bartholomew,
Siobhan, Zhang, Marguerite, Jonah, Ahmad, Henrietta, Ravindra, Ngozi, Esperanza, Torben, Kalani, Desmond
"""))

CITIES = _words("""
Aarhus, Abuja, Accra, Adelaide, Algiers, Almaty, Amsterdam, Ankara, Antwerp, Athens, Atlanta, Auckland, Austin,
Baghdad, Baku, Bangkok, Barcelona, Basel, Beijing, Beirut, Belfast, Belgrade, Bergen, Berlin, Bern, Bilbao,
Birmingham, Bogota, Bologna, Bordeaux, Boston, Bratislava, Bremen, Brighton, Brisbane, Bristol, Brno,
Brussels, Bucharest, Budapest, Buenos Aires, Cairo, Calgary, Cambridge, Canberra, Cape Town, Caracas, Cardiff,
Casablanca, Chennai, Chicago, Cologne, Copenhagen, Cork, Dakar, Dallas, Delhi, Denver, Detroit, Dhaka, Doha,
Dortmund, Dresden, Dubai, Dublin, Durban, Edinburgh, Florence, Frankfurt, Geneva, Genoa, Ghent, Glasgow,
Gothenburg, Granada, Graz, Hamburg, Hanoi, Hanover, Harare, Havana, Helsinki, Hobart, Houston, Istanbul,
Jakarta, Johannesburg, Kampala, Karachi, Kathmandu, Kiev, Kingston, Kolkata, Krakow, Kyoto, Lagos, Lahore,
Leeds, Leipzig, Lille, Lima, Linz, Liverpool, Ljubljana, London, Los Angeles, Luxembourg, Lyon, Madrid,
Malaga, Malmo, Manchester, Manila, Marseille, Melbourne, Mexico City, Miami, Milan, Minsk, Montreal,
Moscow, Mumbai, Munich, Nairobi, Nantes, Naples, New Orleans, New York, Nice, Osaka, Ottawa, Palermo, Paris,
Perth, Philadelphia, Phoenix, Porto, Prague, Pune, Quebec, Quito, Reykjavik, Riga, Rio de Janeiro, Rome,
Rotterdam, Salzburg, San Diego, San Francisco, Santiago, Sao Paulo, Sarajevo, Seattle, Seoul, Seville,
Shanghai, Singapore, Sofia, Split, Stockholm, Stuttgart, Sydney, Taipei, Tallinn, Tampere, Tbilisi, Tehran,
Tokyo, Toronto, Toulouse, Trieste, Tunis, Turin, Utrecht, Valencia, Vancouver, Venice, Verona, Vienna,
Vilnius, Warsaw, Wellington, Winnipeg, Wroclaw, Yokohama, Zagreb, Zurich
""")
HELDOUT_CITIES = set(_words("""
Lisbon, Oslo, Nagoya, Montevideo, Gdansk, Marrakech, Lucerne, Halifax, Kaunas, Bruges, Coimbra, Tromso,
Innsbruck, Asuncion, Salvador, Kochi, Aberdeen, Thessaloniki, Dubrovnik, Minneapolis, San Jose, Hong Kong,
Cluj, Leuven, Zaragoza, Windhoek, Ulaanbaatar, Nuremberg, Yerevan, Brasilia
"""))

PET_NAMES = _words("""
Ace, Alfie, Angel, Apollo, Archie, Bailey, Bandit, Baxter, Bear, Benji, Biscuit, Blue, Bolt, Bonnie, Boots,
Bruno, Bubbles, Buddy, Buster, Butter, Captain, Casper, Charlie, Chester, Chico, Cinnamon, Clover, Coco,
Cookie, Cooper, Daisy, Dash, Diesel, Dixie, Duke, Dusty, Echo, Ellie, Felix, Fido, Finn, Fluffy, Freckles,
Fudge, Ginger, Gizmo, Goldie, Gus, Hazel, Honey, Hunter, Iggy, Jasper, Jelly, Juno, Kiki, Koda, Leo, Lola,
Loki, Lucky, Lulu, Mango, Maple, Max, Midnight, Milo, Mittens, Mocha, Muffin, Murphy, Nala, Nemo, Noodle,
Nugget, Oreo, Otis, Patch, Peanut, Pebbles, Pepper, Pickles, Piper, Pixie, Pretzel, Pudding, Rocky, Rosie,
Rusty, Sadie, Sage, Scout, Shadow, Simba, Skippy, Smokey, Snowball, Socks, Sparky, Spike, Sprinkles, Sunny,
Taco, Teddy, Thor, Tiger, Tilly, Toby, Tucker, Twix, Waffles, Whiskers, Willow, Winnie, Ziggy, Zeus
""")
HELDOUT_PET_NAMES = set(_words("""
Rex, Bella, Pumpkin, Marmalade, Biscotti, Domino, Pip, Rufus, Olive, Nibbles, Thistle, Gatsby, Kumquat,
Bramble, Sherlock, Zelda, Wiggles, Tofu, Hopper, Figaro
"""))

SPECIES = _words("""
dog, cat, rabbit, hamster, parrot, turtle, horse, goldfish, guinea pig, budgie, pony, iguana, lizard, ferret,
snake, canary, tortoise, gerbil, chicken, goat, owl
""")
HELDOUT_SPECIES = set(_words("hedgehog, chinchilla, duck, alpaca"))

COLOURS = _words("""
red, blue, green, yellow, orange, purple, pink, black, white, brown, grey, gray, gold, silver, teal, navy,
lime, cyan, maroon, olive, beige, violet, indigo, coral, amber, crimson, scarlet, magenta, turquoise,
lavender, mint, peach, ivory, cream, charcoal, mustard, burgundy, emerald, sky blue, dark green, light blue
""")
HELDOUT_COLOURS = set(_words("aquamarine, ochre, cobalt, salmon, plum, sea green, rust, tangerine"))

MONTHS = _words("January, February, March, April, May, June, July, August, September, October, November, "
                "December")

# Things for "Do you like X?" small talk.
THINGS = _words("""
coffee, music, jazz, pizza, pasta, football, tennis, books, movies, rain, snow, summer, winter, dogs, cats,
cheese, chocolate, ice cream, dancing, painting, poetry, hiking, swimming, cooking, trains, the sea, mountains,
history, maths, science, games, puzzles, flowers, birds, bread, soup, apples, bananas, running, cycling,
rock music, opera, the beach, gardening, photography, cartoons, robots, space, stars, chess
""")
HELDOUT_THINGS = set(_words("tea, sushi, basketball, yoga, podcasts, karaoke, origami, the mountains in spring"))
